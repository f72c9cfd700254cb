"""The same checks over every registered target and each precision it claims."""

import subprocess
import sys

import numpy as np
import pytest

from edgeexport.errors import ConfigError, ValidationFailed
from edgeexport.targets import REGISTRY, get_target
from tests.conftest import make_cfg, quiet_build

ROWS = "edgeexport.models.digit_rows:model"
DIGITS = "edgeexport.models.digits:model"
COMBOS = [(name, p) for name in REGISTRY for p in get_target(name).precisions]


def test_registry_targets_declare_themselves():
    for name in REGISTRY:
        t = get_target(name)
        assert t.name == name and t.precisions and t.description


@pytest.mark.slow
@pytest.mark.parametrize("target,precision", COMBOS)
def test_build_load_infer_validate(target, precision, rows_npz, digits_npz, tmp_path):
    from edgeexport.config import parse_input_spec

    t = get_target(target)
    for module in t.build_imports:
        pytest.importorskip(module, reason=f"needs the [{t.extra}] extra")
    # dynamic-shape targets get the transformer with a dynamic batch; static-shape ones (TFLite) the digits CNN
    dynamic = not t.check_inputs([parse_input_spec("rows:batchx8x8")])
    model, data, name, shape = (ROWS, rows_npz, "rows", ["batch", 8, 8]) if dynamic else \
        (DIGITS, digits_npz, "image", [1, 1, 8, 8])
    # the bundle self-tests on this machine, so it is built for it (7-bit weights where its int8 kernels
    # saturate: dynamic int8 ops have no exact mode to fall back on)
    options = {"device": "host"} if precision in ("int8", "int8-dynamic") and "device" in t.options_spec else {}
    cfg = make_cfg(target=target, precision=precision, model=model, out=str(tmp_path / "b"),
                   calibration={"path": str(data)}, bench={"enabled": False}, target_options=options)
    result = quiet_build(cfg)
    assert result.report.passed and result.report.task is not None
    manifest = result.manifest
    assert manifest["target"] == target and manifest["precision"] == precision
    assert manifest["inputs"][0]["shape"] == shape
    assert (tmp_path / "b" / manifest["model_file"]).is_file()
    # the artifact runs through its target's Runner at another batch size
    from edgeexport.targets.base import Artifact

    art = Artifact(target, precision, tmp_path / "b", [manifest["model_file"]], manifest["quantization"],
                   manifest["runtime"])
    n = 3 if dynamic else 1
    x = np.load(data)[name][:n]
    art.runtime_config = manifest["runtime_config"]
    with t.load(art) as runner:
        out = runner.infer({name: x})
    assert list(out) == [o["name"] for o in manifest["outputs"]] and out["output"].shape == (n, 10)
    if t.loader_backend() is not None:  # the bundle's own, assembled loader.py, in a fresh interpreter
        # TensorRT bundles self-test on onnxruntime where no GPU is present
        flags = ["--runtime", "onnxruntime"] if target == "trt" and not _has_tensorrt() else []
        run = subprocess.run([sys.executable, str(tmp_path / "b" / "loader.py"), "--selftest", *flags],
                             capture_output=True, text=True)
        assert run.returncode == 0 and "selftest passed" in run.stdout, run.stderr


def _has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


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
