"""The OpenVINO target: both int8 quantizers on the graph families they are chosen for, the compute precision the
bundle pins, what is really integer, and its refusals."""

import json

import numpy as np
import pytest

from edgeexport.errors import ConfigError, TargetError
from edgeexport.targets import get_target
from tests.conftest import make_cfg, quiet_build

pytest.importorskip("openvino", reason="needs the [openvino] extra")
pytest.importorskip("nncf", reason="needs the [openvino] extra")

DIGITS = "edgeexport.models.digits:model"
ROWS = "edgeexport.models.digit_rows:model"  # a small transformer (attention) over the digits' rows


def _build(tmp_path, model, data, precision="int8", tolerance=None, **options):
    cfg = make_cfg(target="openvino", precision=precision, model=model, out=str(tmp_path / "b"),
                   calibration={"path": str(data)}, bench={"enabled": False}, target_options=options,
                   **({"tolerance": tolerance} if tolerance else {}))
    return quiet_build(cfg)


@pytest.mark.slow
def test_auto_quantizer_per_family_and_integer_share(tmp_path, digits_npz, rows_npz):
    cnn = _build(tmp_path / "cnn", DIGITS, digits_npz).manifest["quantization"]
    assert cnn["quantizer_choice"] == "qdq" and cnn["graph_family"] == "cnn" and cnn["weight_rounding"] == "gptq"
    share = cnn["integer_share"]
    assert share["integer_mac_share"] == 1.0 and share["cpu_runtime_integer_layers"] == share["weighted_layers"]
    # a transformer gets both quantizers and keeps the one closer to float on calibration samples: on this small
    # encoder the Q/DQ recipe (0.9999 cosine; NNCF's scheme 0.977, under the gate's 0.98)
    attn = _build(tmp_path / "attn", ROWS, rows_npz).manifest["quantization"]
    trial = attn["quantizer_trial"]["snr_db"]
    assert trial["qdq"] > trial["nncf"] + 10 and attn["quantizer_choice"] == "qdq", trial
    assert attn["graph_family"] == "transformer"
    assert attn["integer_share"]["integer_mac_share"] > 0.5
    nncf = _build(tmp_path / "nncf", ROWS, rows_npz, quantizer="nncf", tolerance={"cosine": 0.9})
    q = nncf.manifest["quantization"]
    assert q["quantizer_choice"] == "nncf" and q["fake_quantize_nodes"] > 0 and q["activation_ranges"] == "mean_minmax"


@pytest.mark.slow
def test_each_quantizer_can_be_asked_for(tmp_path, digits_npz):
    nncf = _build(tmp_path / "n", DIGITS, digits_npz, quantizer="nncf", activation_ranges="minmax")
    q = nncf.manifest["quantization"]
    assert q["quantizer"].startswith("nncf") and q["activation_ranges"] == "minmax" and nncf.report.passed


@pytest.mark.slow
def test_fp32_pins_float32_compute(tmp_path, digits_npz):
    """The CPU plugin picks bf16 by itself on CPUs that have it; an fp32 bundle must not run in bf16."""
    res = _build(tmp_path, DIGITS, digits_npz, precision="fp32")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["runtime_config"]["inference_precision"] == {"CPU": "f32"}
    assert manifest["model_file"] == "model.xml" and manifest["model_files"] == ["model.xml", "model.bin"]
    assert res.report.outputs["output"]["max_abs"] < 1e-4  # bf16 logits differ by ~0.1 here
    from edgeexport.bundle import loader

    model = loader.load(tmp_path / "b")
    assert str(model._backend.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    with pytest.raises(loader.BundleError, match="device 'NOPE' is not available"):
        loader.load(tmp_path / "b", device="NOPE")
    with pytest.raises(loader.BundleError, match="do not apply to openvino bundles"):
        loader.load(tmp_path / "b", engine="auto")
    x = np.zeros((1, 1, 8, 8), np.float32)
    assert model(x)["output"].shape == (1, 10)


def test_check_refuses_what_it_cannot_do():
    t = get_target("openvino")
    fields = lambda **kw: [p.field for p in t.check(make_cfg(target="openvino", model="m.onnx", **kw))]  # noqa: E731
    assert fields(precision="int8", target_options={"quantizer": "best"}) == ["target_options.quantizer"]
    assert fields(precision="int8", target_options={"quantizer": "nncf"},
                  calibration={"method": "entropy"}) == ["calibration.method"]
    assert fields(precision="int8", target_options={"quantizer": "qdq", "preset": "mixed"}) == ["target_options"]
    assert fields(precision="fp32", target_options={"fast_bias_correction": False}) == ["target_options"]
    assert fields(precision="int8-dynamic") == ["precision"]
    with pytest.raises(ConfigError):
        quiet_build(make_cfg(target="openvino", precision="int8", model="m.onnx",
                             target_options={"activation_ranges": "median"}))


@pytest.mark.slow
def test_unknown_ignored_nodes_is_a_clear_error(tmp_path, digits_npz):
    for quantizer in ("nncf", "qdq"):
        with pytest.raises(TargetError, match="(names node|names 1 node)"):
            _build(tmp_path / quantizer, DIGITS, digits_npz, quantizer=quantizer, ignored_nodes=["no_such_node"])
