"""The TensorRT target, verified as far as this machine allows (no TensorRT, no GPU here):
the Q/DQ graph against TensorRT's rules and numerically (onnxruntime vs PyTorch), the calibration cache against the
Q/DQ scales, build_engine.sh against a stand-in trtexec for TensorRT 10 and 11, and the CLI's refusals.
Engine building and running are in the tests marked trt, which skip where TensorRT is missing."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgeexport.bundle import loader
from tests.conftest import make_cfg, quiet_build

DIGITS = "edgeexport.models.digits:model"
ROWS = "edgeexport.models.digit_rows:model"
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def int8_bundles(tmp_path_factory, digits_npz):
    """The digits CNN built both ways: explicit Q/DQ and TensorRT 10's implicit calibration cache."""
    root = tmp_path_factory.mktemp("trt")
    out = {}
    for path in ("explicit", "implicit"):
        cfg = make_cfg(target="trt", precision="int8", model=DIGITS, out=str(root / path),
                       calibration={"path": str(digits_npz)}, target_options={"int8_path": path, "engine": "deferred"})
        out[path] = quiet_build(cfg)
    return out


def _qdq_scales(model):
    """activation tensor -> scale of the QuantizeLinear that quantizes it"""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"}


@pytest.mark.slow
def test_explicit_int8_bundle_follows_tensorrt_rules_and_validates(int8_bundles):
    import onnx

    from edgeexport.targets.trt.target import qdq_violations

    result = int8_bundles["explicit"]
    out = result.out
    m = json.loads((out / "manifest.json").read_text())
    assert result.report.passed and m["validation"]["task"]["drop_points"] <= 1.0
    files = {f["path"] for f in m["files"]}
    assert {"model.onnx", "build_engine.sh", "loader.py"} <= files and "calibration.cache" not in files
    trt = m["runtime_config"]["trt"]
    assert trt["int8_path"] == "explicit" and trt["engine"] is None and trt["tensorrt_majors"] == [10, 11]
    assert m["quantization"]["int8_path"] == "explicit" and m["quantization"]["builder"] == trt["builder"]
    assert "engine deferred to the device" in m["quantization"]["engine_build"]
    assert "onnxruntime" in m["validation"]["runtime"] and "TensorRT itself was not run" in m["validation"]["runtime"]
    assert m["benchmark"]["skipped"].startswith("no engine was built here")
    model = onnx.load(str(out / "model.onnx"))
    assert qdq_violations(model) == []
    graph = model.graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    # every weighted op takes int8 weights (per-channel for the convolutions) and int8 data
    producer = {o: n for n in graph.node for o in n.output}
    consumers = {i: n for n in graph.node for i in n.input}
    for node in (n for n in graph.node if n.op_type in ("Conv", "Gemm")):
        assert producer[node.input[0]].op_type == producer[node.input[1]].op_type == "DequantizeLinear"
        # TensorRT's recommended placement: inputs quantized, outputs left to the next op
        assert node.output[0] not in consumers or consumers[node.output[0]].op_type != "QuantizeLinear"
    # the device loader runs the bundle exactly as validated when asked for onnxruntime
    assert loader.load(out, runtime="onnxruntime").selftest(verbose=False)


@pytest.mark.slow
def test_calibration_cache_holds_the_q_dq_scales(int8_bundles):
    import onnx

    out = int8_bundles["implicit"].out
    m = json.loads((out / "manifest.json").read_text())
    assert {"model.onnx", "calibration.cache"} <= {f["path"] for f in m["files"]}
    trt = m["runtime_config"]["trt"]
    assert trt["int8_path"] == "implicit" and trt["tensorrt_majors"] == [10]
    assert trt["calibration_cache"] == "calibration.cache"
    reqs = (out / "requirements.txt").read_text()
    assert "pip install 'tensorrt>=10,<11'" in reqs  # said, for x86 ...
    assert not [ln for ln in reqs.splitlines() if ln.startswith("tensorrt")]  # ... never a line pip installs on Jetson
    floats = onnx.load(str(out / "model.onnx"))
    assert not any(n.op_type.endswith("QuantizeLinear") for n in floats.graph.node)  # TensorRT quantizes it
    from edgeexport.targets.trt.backend import read_calibration_cache

    header, cache = read_calibration_cache((out / "calibration.cache").read_text())
    assert header == "TRT-100300-EntropyCalibration2"
    tensors = {o for n in floats.graph.node for o in n.output} | {i.name for i in floats.graph.input}
    assert set(cache) <= tensors and len(cache) >= 8
    qdq = _qdq_scales(onnx.load(str(int8_bundles["explicit"].out / "model.onnx")))
    shared = set(qdq) & set(cache)
    assert len(shared) >= 4
    for name in shared:
        assert cache[name] == pytest.approx(qdq[name], rel=1e-6), name


def test_checker_flags_what_tensorrt_rejects():
    from onnx import TensorProto, helper, numpy_helper

    from edgeexport.targets.trt.target import qdq_violations

    def init(name, arr):
        return numpy_helper.from_array(np.asarray(arr), name)

    inits = [init("s", np.float32(0.1)), init("zp_u8", np.uint8(128)), init("zp0", np.int8(0)),
             init("w_q", np.ones((4, 2, 3, 3), np.int8)), init("w_s", np.full(4, 0.01, np.float32)),
             init("w_zp", np.zeros(4, np.int8)), init("b_q", np.zeros(4, np.int32)), init("b_s", np.float32(0.001)),
             init("b_zp", np.int32(0))]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp_u8"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp_u8"], ["xd"], name="dq_x"),
        helper.make_node("Relu", ["xq"], ["bad_consumer"], name="relu_on_int8"),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], name="dq_w", axis=1),
        helper.make_node("DequantizeLinear", ["b_q", "b_s", "b_zp"], ["b"], name="dq_b"),
        helper.make_node("Conv", ["xd", "w", "b"], ["y"], name="conv"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    problems = qdq_violations(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    text = "\n".join(problems)
    assert "QuantizeLinear q_x: zero point type UINT8; TensorRT takes int8 only" in text
    assert "QuantizeLinear q_x: feeds ['Relu'], not a DequantizeLinear" in text
    assert "DequantizeLinear dq_b: int32 (bias) Q/DQ is not supported by TensorRT" in text
    assert "Conv conv: per-channel weight scales on axis 1, TensorRT needs the output-channel axis 0" in text


@pytest.mark.slow
def test_dynamic_batch_profile_reaches_the_builder_settings_and_script(rows_npz, tmp_path):
    cfg = make_cfg(target="trt", precision="fp16", model=ROWS, out=str(tmp_path / "b"),
                   calibration={"path": str(rows_npz)}, bench={"enabled": False},
                   target_options={"profiles": {"batch": [1, 4, 8]}, "engine": "deferred"})
    result = quiet_build(cfg)
    builder = result.manifest["runtime_config"]["trt"]["builder"]
    assert builder["profiles"] == {"rows": {"min": [1, 8, 8], "opt": [4, 8, 8], "max": [8, 8, 8]}}
    script = (tmp_path / "b" / "build_engine.sh").read_text()
    assert "--minShapes=rows:1x8x8 --optShapes=rows:4x8x8 --maxShapes=rows:8x8x8" in script
    import onnx

    graph = onnx.load(str(tmp_path / "b" / "model.onnx")).graph
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    assert [i.type.tensor_type.elem_type for i in graph.input] == [onnx.TensorProto.FLOAT]  # I/O kept as declared


@pytest.mark.slow
def test_a_bert_builds_for_tensorrt_with_q_dq_on_its_weighted_matmuls_only(tmp_path):
    """A BERT built here from a config (not MiniLM), at int8: Q/DQ where TensorRT fuses (the weighted MatMuls), not
    on LayerNorm, Softmax or the mask's Add; batch and sequence profiles in the manifest and in build_engine.sh."""
    import onnx

    from edgeexport.models.sentences import write_sentences
    from edgeexport.targets.trt.target import qdq_violations
    from tests.conftest import save_tiny_bert

    model = save_tiny_bert(tmp_path / "tiny-bert", 2, 128, seed=2)
    calib = write_sentences(tmp_path / "calib.txt", 64)
    val = write_sentences(tmp_path / "val.txt", 24, skip=64)
    cfg = make_cfg(target="trt", precision="int8", model=f"hf:{model}", out=str(tmp_path / "b"),
                   calibration={"path": str(calib), "validation_path": str(val), "max_length": 32},
                   bench={"enabled": False},
                   target_options={"profiles": {"batch": [1, 1, 4], "sequence": [1, 32, 32]}})
    result = quiet_build(cfg)
    assert result.report.passed
    graph = onnx.load(str(result.out / "model.onnx")).graph
    assert qdq_violations(onnx.load(str(result.out / "model.onnx"))) == []
    producer = {o: n for n in graph.node for o in n.output}
    fed = {n.op_type for n in graph.node for i in n.input
           if i in producer and producer[i].op_type == "DequantizeLinear"}
    assert "MatMul" in fed and not fed & {"LayerNormalization", "Softmax", "Where"}
    weighted = [n for n in graph.node if n.op_type == "MatMul" and producer.get(n.input[1]) is not None
                and producer[n.input[1]].op_type == "DequantizeLinear"]
    assert len(weighted) == 2 * 6  # Q, K, V, attention output, FFN in, FFN out in each of 2 layers
    profiles = result.manifest["runtime_config"]["trt"]["builder"]["profiles"]
    assert profiles["input_ids"] == {"min": [1, 1], "opt": [1, 32], "max": [4, 32]}
    script = (result.out / "build_engine.sh").read_text()
    assert "--minShapes=input_ids:1x1,attention_mask:1x1" in script and "--maxShapes=input_ids:4x32," in script


def _fake_trtexec(tmp_path):
    log = tmp_path / "trtexec.args"
    exe = tmp_path / "trtexec"
    exe.write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {log}\n')
    exe.chmod(0o755)
    return exe, log


def _run_script(script, tmp_path, major):
    exe, log = _fake_trtexec(tmp_path)
    log.unlink(missing_ok=True)
    env = dict(os.environ, TRTEXEC=str(exe), TRT_MAJOR=str(major), PATH="/usr/bin:/bin")
    r = subprocess.run(["sh", str(script), str(tmp_path / "out.plan")], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    return r, (log.read_text().splitlines() if log.exists() else [])


def _script_bundle(tmp_path, **trt):
    from edgeexport.targets.trt.target import build_script

    builder = {"workspace_mb": 2048, "timing_cache": True, "dla_core": 0, "gpu_fallback": True,
               "hardware_compatibility": "none", "version_compatible": True,
               "profiles": {"ids": {"min": [1, 128], "opt": [8, 128], "max": [32, 128]}}}
    cfg = {"precision": "int8", "int8_path": "explicit", "builder": builder, "tensorrt_majors": [10, 11]}
    cfg.update(trt)
    (tmp_path / "b").mkdir()
    script = tmp_path / "b" / "build_engine.sh"
    script.write_text(build_script(cfg))
    (tmp_path / "b" / "calibration.cache").write_text("TRT-100300-EntropyCalibration2\nids: 3c000000\n")
    return script


def test_build_script_runs_trtexec_for_tensorrt_10_and_11(tmp_path):
    script = _script_bundle(tmp_path)
    common = [f"--onnx={tmp_path}/b/model.onnx", f"--saveEngine={tmp_path}/out.plan",
              f"--timingCacheFile={tmp_path}/out.plan.timing", "--memPoolSize=workspace:2048",
              "--minShapes=ids:1x128", "--optShapes=ids:8x128", "--maxShapes=ids:32x128", "--useDLACore=0",
              "--allowGPUFallback", "--versionCompatible"]
    r10, args10 = _run_script(script, tmp_path, 10)
    assert r10.returncode == 0, r10.stderr
    assert args10 == common + ["--stronglyTyped"]
    r11, args11 = _run_script(script, tmp_path, 11)
    assert r11.returncode == 0 and args11 == common  # 11: strongly typed always, the flag is gone
    r8, _ = _run_script(script, tmp_path, 8)
    assert r8.returncode == 2 and "needs TensorRT 10 or 11; found 8" in r8.stderr


def test_build_script_implicit_path_is_tensorrt_10_only(tmp_path):
    script = _script_bundle(tmp_path, int8_path="implicit", tensorrt_majors=[10])
    r10, args10 = _run_script(script, tmp_path, 10)
    assert r10.returncode == 0, r10.stderr
    assert args10[-2:] == ["--int8", f"--calib={tmp_path}/out.plan.calib"] and "--stronglyTyped" not in args10
    assert (tmp_path / "out.plan.calib").read_text().startswith("TRT-")
    r11, args11 = _run_script(script, tmp_path, 11)
    assert r11.returncode == 2 and "TensorRT 11 removed" in r11.stderr and not args11


@pytest.mark.slow
@pytest.mark.skipif(HAS_TRT, reason="checks the machine without TensorRT")
def test_verify_and_bench_run_a_tensorrt_bundle_on_onnxruntime_when_asked_and_say_so(cli, int8_bundles):
    out = int8_bundles["explicit"].out
    r = cli("verify", out)
    assert r.exit_code == 1 and "--runtime onnxruntime" in r.stderr and "Traceback" not in r.stderr
    r = cli("verify", out, "--runtime", "onnxruntime")
    assert r.exit_code == 0, r.stderr
    r = cli("bench", out, "--runtime", "onnxruntime", "--runs", "5", "--cold-runs", "0")
    assert r.exit_code == 0, r.stderr
    assert "runtime:     onnxruntime (asked with --runtime; not the bundle's own runtime" in r.stdout
    r = cli("bench", out, "--runs", "5", "--cold-runs", "0")
    assert r.exit_code == 1 and "--runtime onnxruntime" in r.stderr


def test_cli_refuses_what_cannot_be_built_here(cli, digits_npz, tmp_path):
    base = ["build", "--target", "trt", "--model", DIGITS, "--calib", str(digits_npz), "--no-bench"]
    cases = {
        "now": (["--engine", "now"], "--engine now needs TensorRT and an NVIDIA GPU on this machine"),
        "path": (["--precision", "fp16", "--option", "int8_path=implicit"], "int8_path applies to --precision int8"),
        "prof": (["--option", "profiles={batch: [1, 8, 4]}"], "not dynamic dimensions"),
        "dla": (["--precision", "fp32", "--option", "dla_core=0", "--option", "gpu_fallback=false"],
                "the DLA runs fp16 and int8 only"),
        "prec": (["--precision", "int8-dynamic"], "does not support precision 'int8-dynamic'"),
    }
    if HAS_TRT:
        del cases["now"]
    for name, (extra, message) in cases.items():
        out = tmp_path / name
        r = cli(*base, *extra, "--out", out)
        assert r.exit_code == (1 if name == "now" else 2), (name, r.output)
        assert message in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
        assert not out.exists()


def test_profile_rules():
    from edgeexport.config import parse_input_spec
    from edgeexport.errors import ConfigError
    from edgeexport.targets.trt.target import resolve_profiles

    class Data:
        def calibration(self):
            for n in (3, 3, 5):
                yield {"ids": np.zeros((n, 16), np.int64)}

    specs = [parse_input_spec("ids:batchx16:int64")]
    profiles, notes = resolve_profiles(specs, {}, Data())
    assert profiles == {"ids": {"min": [1, 16], "opt": [3, 16], "max": [5, 16]}} and "from the data" in notes[0]
    for bad, match in [({"batch": [4, 2, 8]}, "min <= opt <= max"), ({"batch": [1, 2]}, r"\[min, opt, max\]"),
                       ({"seq": [1, 2, 3]}, "not dynamic dimensions"), ({"batch": [0, 1, 1]}, "1 <= min")]:
        with pytest.raises(ConfigError, match=match):
            resolve_profiles(specs, bad, Data())


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed here (its wheels come from NVIDIA's index)")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engine_builds_runs_and_caches_on_a_gpu(precision, digits_npz, tmp_path):  # pragma: no cover - needs TRT
    cfg = make_cfg(target="trt", precision=precision, model=DIGITS, out=str(tmp_path / "b"),
                   calibration={"path": str(digits_npz)}, target_options={"engine": "now"})
    result = quiet_build(cfg)
    assert result.manifest["runtime_config"]["trt"]["engine"]["file"] == "model.plan"
    model = loader.load(tmp_path / "b", engine="rebuild", engine_cache=tmp_path / "cache")
    assert model.selftest(verbose=False)
    assert list((tmp_path / "cache").glob("*.plan")) and json.loads(next((tmp_path / "cache").glob("*.json")).read_text())
    r = subprocess.run([sys.executable, str(tmp_path / "b" / "loader.py"), "--selftest"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
