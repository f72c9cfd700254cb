"""TFLite target end to end: real TensorFlow converter, real LiteRT interpreter, real digits."""

import json
import threading

import numpy as np
import pytest

pytest.importorskip("onnx2tf", reason="needs the [tflite] extra")
pytestmark = [pytest.mark.slow, pytest.mark.tflite]

from edgeexport.bundle import loader  # noqa: E402
from tests.conftest import make_cfg, quiet_build  # noqa: E402

MODEL = "edgeexport.models.digits:model"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, digits_npz):
    root = tmp_path_factory.mktemp("tflite")
    out = {}
    for precision, opts in (("fp32", {}), ("fp16", {}), ("dynamic-range", {}), ("int8", {}),
                            ("int8-io", {"io_dtype": "int8"}), ("uint8-io", {"io_dtype": "uint8"})):
        p = "int8" if precision.endswith("-io") else precision
        cfg = make_cfg(target="tflite", precision=p, model=MODEL, out=str(root / precision), target_options=opts,
                       calibration={"path": str(digits_npz), "samples": 256, "holdout": 284}, bench={"runs": 5})
        out[precision] = quiet_build(cfg)
    return out


def test_every_precision_validates_with_honest_names(bundles):
    for name, result in bundles.items():
        m = result.manifest
        assert result.report.passed and loader.load(result.out).selftest(verbose=False), name
        assert m["model_file"] == f"model_{m['precision']}.tflite"
    assert bundles["dynamic-range"].manifest["quantization"]["activation_dtypes"] == ["float32"]
    assert "float activations" in bundles["dynamic-range"].manifest["precision_label"]
    assert "full-integer" in bundles["int8"].manifest["precision_label"]


def test_int8_accuracy_within_one_point(bundles):
    task = bundles["int8"].report.task
    assert task["samples"] == 284 and task["drop_points"] <= 1.0 and task["accuracy"] > 0.95


def _op_output_dtypes(path):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    dtypes = {d["index"]: np.dtype(d["dtype"]) for d in it.get_tensor_details()}
    return [(op["op_name"], dtypes[int(o)]) for op in it._get_ops_details() for o in op["outputs"]]


def _weighted_ops(path):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    det = it.get_tensor_details()
    return [(it.get_tensor(op["inputs"][1]).astype(np.float64), det[op["inputs"][1]]["quantization_parameters"])
            for op in it._get_ops_details() if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]


def test_int8_weights_are_gptq_rounded_on_tflites_grid_and_ranges_are_percentiles(bundles):
    q = bundles["int8"].manifest["quantization"]
    assert q["weight_rounding"] == "gptq" and q["gptq_layers"] >= 3
    assert q["calibration_method"] == "percentile" and q["calibration_method_requested"] == "auto"
    assert q["percentile_ranges_narrowed"] > 0
    report = (bundles["int8"].out / "report.md").read_text()
    assert "- weight_rounding: `gptq`" in report and "- calibration_method: `percentile`" in report
    floats = _weighted_ops(bundles["fp32"].out / "model_fp32.tflite")
    ints = _weighted_ops(bundles["int8"].out / "model_int8.tflite")
    assert len(floats) == len(ints) >= 3
    moved = 0
    for (w, _), (qw, params) in zip(floats, ints):
        axis = params["quantized_dimension"]
        scale = np.expand_dims(params["scales"], [a for a in range(qw.ndim) if a != axis])
        # the converter's grid is the float weights' max |w| / 127 per output channel: GPTQ kept each maximum
        assert np.allclose(np.abs(w).max(axis=tuple(a for a in range(w.ndim) if a != axis), keepdims=True) / 127,
                           scale, rtol=1e-5)
        assert np.abs(qw).max() <= 127
        moved += int(np.sum(qw != np.round(w / scale)))
    assert moved > 0  # some weights were rounded the other way than nearest, and the converter kept them


def test_full_int8_really_has_int8_activations(bundles):
    """Independent of the build's own check: every op output is int8, except the float I/O converters."""
    res = bundles["int8"]
    ops = _op_output_dtypes(res.out / res.manifest["model_file"])
    compute = [(op, dt) for op, dt in ops if op not in ("QUANTIZE", "DEQUANTIZE")]
    assert compute and all(dt == np.int8 for _, dt in compute), compute
    assert [op for op, _ in ops].count("DEQUANTIZE") == 1  # only the final output back to float
    io_ops = _op_output_dtypes(bundles["int8-io"].out / "model_int8.tflite")
    assert all(dt == np.int8 for _, dt in io_ops)  # int8 in, int8 out: no float anywhere
    dr = _op_output_dtypes(bundles["dynamic-range"].out / "model_dynamic-range.tflite")
    assert any(dt == np.float32 for op, dt in dr if op == "CONV_2D")  # activations stay float: not "int8"


@pytest.mark.parametrize("name,dtype", [("int8-io", np.int8), ("uint8-io", np.uint8)])
def test_integer_io_is_quantized_by_the_loader(bundles, digits_npz, name, dtype):
    res = bundles[name]
    model = loader.load(res.out)
    assert model._backend.in_details["image"]["dtype"] == dtype
    x = np.load(digits_npz)["image"][:1]
    out = model(x)["output"]
    assert out.dtype == np.float32 and out.shape == (1, 10)
    float_model = loader.load(bundles["int8"].out)
    assert out.argmax() == float_model(x)["output"].argmax()


def test_native_layout_skips_the_transpose(bundles, digits_npz):
    res = bundles["fp32"]
    assert res.manifest["runtime_config"]["input_perm"] == {"image": [0, 2, 3, 1]}
    x = np.load(digits_npz)["image"][:1]
    model_layout = loader.load(res.out)(x)["output"]
    native = loader.load(res.out, layout="native")
    assert native.inputs[0]["shape"] == [1, 8, 8, 1]
    np.testing.assert_allclose(native(np.transpose(x, (0, 2, 3, 1)))["output"], model_layout, rtol=1e-6)
    with pytest.raises(loader.InputError, match="shape"):
        native(x)  # NCHW into the native (NHWC) model is refused, not silently wrong


def test_one_model_from_eight_threads(bundles, digits_npz):
    model = loader.load(bundles["int8"].out, threads=1)
    xs = np.load(digits_npz)["image"][:40]
    expected = [model(xs[i : i + 1])["output"] for i in range(len(xs))]
    errors = []

    def work(seed):
        rng = np.random.default_rng(seed)
        for _ in range(250):
            i = int(rng.integers(len(xs)))
            if not np.array_equal(model(xs[i : i + 1])["output"], expected[i]):
                errors.append(i)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_transformer_int8_is_refused_as_not_full_integer(cli, rows_npz, tmp_path):
    out = tmp_path / "b"
    base = ("build", "--target", "tflite", "--model", "edgeexport.models.digit_rows:model", "--calib", rows_npz,
            "--input", "rows:1x8x8:float32", "--no-bench")
    r = cli(*base, "--precision", "int8", "--out", out)
    assert r.exit_code == 1 and "not full-integer" in r.stderr and "dynamic-range" in r.stderr
    assert not out.exists()
    r = cli(*base, "--precision", "dynamic-range", "--out", out)
    assert r.exit_code == 0, r.stderr
    assert "rebuilt it from builtin ops" in r.stderr  # exact GELU's Erf has no TFLite builtin
    assert json.loads((out / "manifest.json").read_text())["validation"]["passed"]


def test_tflite_rules(cli, rows_npz, digits_npz, tmp_path):
    r = cli("build", "--target", "tflite", "--model", "edgeexport.models.digit_rows:model", "--calib", rows_npz,
            "--precision", "fp32", "--out", tmp_path / "a")
    assert r.exit_code == 2 and "static shapes" in r.stderr and "--input rows:1x8x8:float32" in r.stderr
    r = cli("build", "--target", "tflite", "--model", MODEL, "--calib", digits_npz, "--precision", "int8-dynamic",
            "--out", tmp_path / "b")
    assert r.exit_code == 2 and "dynamic-range" in r.stderr
    r = cli("build", "--target", "ort", "--model", MODEL, "--calib", digits_npz, "--precision", "dynamic-range",
            "--out", tmp_path / "c")
    assert r.exit_code == 2 and "does not support precision 'dynamic-range'" in r.stderr
    r = cli("build", "--target", "tflite", "--model", MODEL, "--calib", digits_npz, "--precision", "fp16",
            "--io-dtype", "int8", "--out", tmp_path / "d")
    assert r.exit_code == 2 and "needs --precision int8" in r.stderr
    r = cli("build", "--target", "tflite", "--model", MODEL, "--calib", digits_npz, "--precision", "int8",
            "--calib-method", "entropy", "--out", tmp_path / "e")
    assert r.exit_code == 2 and "has no entropy calibration" in r.stderr and "minmax or percentile" in r.stderr
    r = cli("build", "--target", "tflite", "--model", MODEL, "--calib", digits_npz, "--precision", "int8",
            "--option", "weight_rounding=adaround", "--out", tmp_path / "f")
    assert r.exit_code == 2 and "weight_rounding must be gptq or nearest" in r.stderr


def test_percentile_ranges_that_cannot_be_measured_fall_back_to_min_max_and_say_so(digits_npz, tmp_path,
                                                                                    monkeypatch):
    import edgeexport.targets.tflite.target as tflite_target

    def fails(*args, **kwargs):
        raise RuntimeError("an op this interpreter has no kernel for")

    monkeypatch.setattr(tflite_target, "percentile_ranges", fails)
    cfg = make_cfg(target="tflite", precision="int8", model=MODEL, out=str(tmp_path / "b"),
                   calibration={"path": str(digits_npz), "samples": 128}, bench={"enabled": False})
    result = quiet_build(cfg)
    q = result.manifest["quantization"]
    assert result.report.passed and q["calibration_method"] == "minmax" and q["percentile_ranges_narrowed"] == 0
    assert "no kernel for" in q["calibration_fallback"]
    assert any("min/max ranges were used" in n for n in result.manifest["notes"])


CONV1D = '''
import torch
import torch.nn as nn


class Rows(nn.Module):
    """A Conv1d over [batch, 4 channels, 16 steps]: a channels-first 3-D input, which onnx2tf makes NWC."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(4, 16, 3, padding=1)
        self.head = nn.Linear(16 * 16, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def build():
    return {"model": Rows().eval(), "inputs": ["x:1x4x16:float32"]}
'''


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_channels_first_3d_input_is_transposed_like_an_image(cli, digits_npz, tmp_path, precision):
    """onnx2tf turns a [1, 4, 16] NCW input into [1, 16, 4] (NWC), as it turns NCHW into NHWC; the build used to stop
    at 'unknown layout change'. The manifest records the permutation and the loader applies it."""
    import subprocess
    import sys

    x = np.load(digits_npz)["image"].reshape(-1, 4, 16).astype(np.float32)
    np.savez(tmp_path / "rows.npz", x=x)
    (tmp_path / "rows.py").write_text(CONV1D)
    out = tmp_path / "b"
    r = cli("build", "--target", "tflite", "--model", f"{tmp_path / 'rows.py'}:build", "--calib", tmp_path / "rows.npz",
            "--precision", precision, "--out", out, "--no-bench")
    assert r.exit_code == 0, r.stderr
    rc = json.loads((out / "manifest.json").read_text())["runtime_config"]
    assert rc["input_perm"] == {"x": [0, 2, 1]} and rc["native_inputs"][0]["shape"] == [1, 16, 4]
    run = subprocess.run([sys.executable, str(out / "loader.py"), "--selftest"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
