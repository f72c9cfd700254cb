"""The same checks over every registered target and each precision it claims."""

import numpy as np
import pytest

from edgeexport.errors import ConfigError, ValidationFailed
from edgeexport.targets import REGISTRY, get_target
from tests.conftest import make_cfg, quiet_build

ROWS = "edgeexport.models.digit_rows:model"
COMBOS = [(name, p) for name in REGISTRY for p in get_target(name).precisions]


def test_registry_targets_declare_themselves():
    for name in REGISTRY:
        t = get_target(name)
        assert t.name == name and t.precisions and t.description


@pytest.mark.slow
@pytest.mark.parametrize("target,precision", COMBOS)
def test_build_load_infer_validate(target, precision, rows_npz, tmp_path):
    from edgeexport.bundle import loader

    cfg = make_cfg(target=target, precision=precision, model=ROWS, out=str(tmp_path / "b"),
                   calibration={"path": str(rows_npz)}, bench={"enabled": False})
    result = quiet_build(cfg)
    assert result.report.passed and result.report.task is not None
    manifest = result.manifest
    assert manifest["target"] == target and manifest["precision"] == precision
    assert manifest["inputs"][0]["shape"] == ["batch", 8, 8]
    assert (tmp_path / "b" / manifest["model_file"]).is_file()
    # the artifact runs through its target's Runner at another batch size
    from edgeexport.targets.base import Artifact

    art = Artifact(target, precision, tmp_path / "b", [manifest["model_file"]], manifest["quantization"],
                   manifest["runtime"])
    x = np.load(rows_npz)["rows"][:3]
    with get_target(target).load(art) as runner:
        out = runner.infer({"rows": x})
    assert list(out) == [o["name"] for o in manifest["outputs"]] and out["output"].shape == (3, 10)
    if target in loader._BACKENDS:
        assert loader.load(tmp_path / "b").selftest(verbose=False)


@pytest.mark.parametrize("target", list(REGISTRY))
def test_check_rejects_unsupported_settings(target):
    t = get_target(target)
    problems = t.check(make_cfg(target=target, precision=t.precisions[0], model="m.onnx",
                                target_options={"no_such_option": 1}))
    assert [p.field for p in problems] == ["target_options.no_such_option"]
    bad_precision = [p for p in ("fp32", "fp16", "int8-dynamic", "int8") if p not in t.precisions]
    for p in bad_precision:
        assert any(pr.field == "precision" for pr in t.check(make_cfg(target=target, precision=p, model="m.onnx")))


@pytest.mark.slow
def test_gate_catches_a_bad_backend(tiny_model, tiny_npz, tmp_path):
    """The fake target perturbs outputs: the pipeline must refuse to bundle them."""
    cfg = make_cfg(target="fake", model=f"{tiny_model}:build", calibration={"path": str(tiny_npz)},
                   out=str(tmp_path / "b"), target_options={"noise": 0.5})
    with pytest.raises(ValidationFailed) as e:
        quiet_build(cfg)
    assert not e.value.report.passed and not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match="noise must be"):
        quiet_build(make_cfg(target="fake", model=f"{tiny_model}:build", out=str(tmp_path / "c"),
                             target_options={"noise": -1}))
