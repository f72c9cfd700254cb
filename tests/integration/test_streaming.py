"""Models as they come: a stateful streaming model (recurrent state + a scalar input, a probability out), and an
ONNX graph whose layers sit in If branches, built end to end."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import make_cfg, quiet_build

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stream_npz(tmp_path_factory):
    from edgeexport.models.streaming import write_calibration

    return write_calibration(tmp_path_factory.mktemp("stream") / "stream.npz", images=100)  # 800 rows


@pytest.fixture(scope="module")
def int8_stream_bundle(stream_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("sb") / "bundle"
    cfg = make_cfg(model="edgeexport.models.streaming:model", precision="int8", out=str(out),
                   calibration={"path": str(stream_npz), "holdout": 160},
                   target_options={"device": "host"})
    return quiet_build(cfg), out


def test_a_stateful_model_is_validated_by_streaming_its_own_state(int8_stream_bundle):
    result, out = int8_stream_bundle
    report = result.report
    assert result.config.state == {"h": "hn"}  # detected by name
    assert report.outputs["prob"]["kind"] == "probability" and report.outputs["hn"]["kind"] == "state"
    assert "cosine" not in report.outputs["prob"]  # one value per sample
    assert {c.metric for c in report.checks} == {"prob_mean_abs", "flip_rate"}  # the state is judged by its effect
    assert report.stream["steps"] == 8 and len(report.stream["prob"]) == 4  # 8 rows per image
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["state"]["pairs"] == {"h": "hn"} and manifest["state"]["initial"]["h"]["shape"] == [1, 1, 32]
    assert manifest["export"]["stream"]["streams"] == 100
    assert manifest["calibration"]["holdout_samples"] == 160
    assert any(i["name"] == "scale" and i["shape"] == [] for i in manifest["inputs"])
    assert "Streamed validation (h <- hn)" in (out / "report.md").read_text()


def test_the_loader_streams_and_its_selftest_replays_the_golden_stream(int8_stream_bundle, stream_npz):
    _, out = int8_stream_bundle
    run = subprocess.run([sys.executable, str(out / "loader.py"), "--selftest"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "golden stream step 2 prob" in run.stdout
    sys.path.insert(0, str(out))
    try:
        import loader  # the bundle's own one-file loader
    finally:
        sys.path.remove(str(out))
    model = loader.load(out, int8_kernels="exact")
    data = np.load(stream_npz)
    rows, scale = data["row"][:8], np.asarray(data["scale"])
    model.reset()
    streamed = [model.stream({"row": r, "scale": scale})["prob"] for r in rows]
    h = np.zeros((1, 1, 32), np.float32)  # the same steps by hand: each call fed the state the last one returned
    for r, got in zip(rows, streamed):
        o = model({"row": r, "h": h, "scale": scale})
        np.testing.assert_array_equal(o["prob"], got)
        h = o["hn"]
    model.reset()
    np.testing.assert_array_equal(model.stream({"row": rows[0], "scale": scale})["prob"], streamed[0])
    with pytest.raises(loader.InputError, match="feeds the state itself"):
        model.stream({"row": rows[0], "h": h, "scale": scale})


def _if_graph(path):
    """A detector-like ONNX: audio x, a scalar sample rate sr; both branches of If(sr == 16000) hold the MatMuls
    (silero-vad's shape: its Conv and LSTM layers sit inside If branches)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w2")

    def branch(name, w):
        return helper.make_graph([helper.make_node("MatMul", ["x", w], [f"{name}_y"], name=f"{name}_mm")], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 8])])
    nodes = [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array(16000, np.int64))),
             helper.make_node("Equal", ["sr", "k"], ["is16"]),
             helper.make_node("If", ["is16"], ["y"], then_branch=branch("then", "w1"), else_branch=branch("else", "w2"))]
    graph = helper.make_graph(nodes, "detector", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16]),
                                                  helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_an_onnx_with_a_scalar_input_builds_and_int8_of_if_branches_is_refused(cli, tmp_path):
    model = _if_graph(tmp_path / "detector.onnx")
    x = np.random.default_rng(1).standard_normal((80, 1, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, sr=np.int64(16000))  # one sample rate for every sample
    ok = cli("build", "--model", model, "--calib", tmp_path / "d.npz", "--precision", "fp32", "--out", tmp_path / "b",
             "--input", "sr::int64")  # declares only the scalar; x keeps the graph's shape
    assert ok.exit_code == 0, ok.output
    assert "sr: one value (16000) shared by every sample" in ok.output
    run = subprocess.run([sys.executable, str(tmp_path / "b" / "loader.py"), "--selftest"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    bad = cli("build", "--model", model, "--calib", tmp_path / "d.npz", "--precision", "int8", "--out", tmp_path / "q",
              "--option", "device=host")
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert "nothing in the built model runs in integers" in bad.output and "2 MatMul" in bad.output
    assert not (tmp_path / "q").exists()


# --- real models shipped with their weights (requirements-models.txt) ------------------------------------------------

def test_silero_vad_onnx_streams_with_its_scalar_sample_rate_and_its_int8_is_refused(cli, tmp_path):
    """silero-vad as shipped: input chunk, recurrent state [2, batch, 128] and an int64 scalar sample rate in;
    probability and next state out. Its layers sit inside If branches on the sample rate."""
    from edgeexport.models.speech import vad_onnx, write_vad_data

    model = vad_onnx()
    if not model.is_file():
        pytest.skip("silero-vad is not installed (requirements-models.txt)")
    data = write_vad_data(tmp_path / "vad.npz", utterances=6)
    r = cli("build", "--model", model, "--calib", data, "--precision", "fp32", "--out", tmp_path / "fp32",
            "--holdout", "60", "--no-bench")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "fp32" / "manifest.json").read_text())
    assert m["state"]["pairs"] == {"state": "stateN"} and m["validation"]["stream"]["pairs"] == {"state": "stateN"}
    assert m["validation"]["outputs"]["output"]["kind"] == "probability"
    assert "cosine" not in m["validation"]["outputs"]["output"]
    assert "not counted: 12 Conv, 4 LSTM inside If/Loop/Scan subgraphs" in r.output
    run = subprocess.run([sys.executable, str(tmp_path / "fp32" / "loader.py"), "--selftest"], capture_output=True,
                         text=True)
    assert run.returncode == 0 and "golden stream step 2 output" in run.stdout, run.stderr
    q = cli("build", "--model", model, "--calib", data, "--precision", "int8", "--out", tmp_path / "int8",
            "--holdout", "60", "--option", "device=host")
    assert q.exit_code == 1 and "nothing in the built model runs in integers" in q.output
    assert "12 Conv, 4 LSTM" in q.output and not (tmp_path / "int8").exists()


def _speaker_build(tmp_path, precision):
    """resemblyzer's pretrained encoder built at ``precision`` on 48 speech-like partials (16 held out)."""
    from edgeexport.models.speech import package_file, write_speaker_data

    if not package_file("resemblyzer", "pretrained.pt").is_file():
        pytest.skip("resemblyzer is not installed (requirements-models.txt)")
    data = write_speaker_data(tmp_path / "spk.npz", speakers=12, partials=4)
    return quiet_build(make_cfg(model="edgeexport.models.speech:speaker_model", precision=precision,
                                out=str(tmp_path / "b"), calibration={"path": str(data), "holdout": 16,
                                                                      "min_holdout": 16},
                                bench={"enabled": False}))


def test_the_lstm_speaker_encoder_is_validated_as_an_embedding(tmp_path):
    """resemblyzer's pretrained encoder (its shipped weights): an L2-normalized ReLU embedding lies in [0, 1] but is
    no probability and no classifier; it was refused on top-1 at cosine 0.9994 before output kinds. Its FLOPs are
    the LSTM's (~0.43 GFLOP per 1.6 s partial), not the head's."""
    result = _speaker_build(tmp_path, "fp16")
    out = result.report.outputs["output"]
    assert out["kind"] == "embedding" and "unit length" in out["kind_reason"] and "top1" not in out
    assert result.report.passed and out["cosine"] > 0.999
    assert 0.4e9 < result.manifest["model_stats"]["flops_per_sample"] < 0.5e9


def test_the_speaker_encoders_first_lstm_stays_float_at_int8_dynamic(tmp_path):
    """resemblyzer reads a mel *power* spectrogram (3e-9..51): one 8-bit range rounds 87% of its values to zero, and
    with every LSTM int8 the embedding cosine was 0.75. The LSTM reading it stays float (the other two and the head
    are int8) and the build passes."""
    result = _speaker_build(tmp_path, "int8-dynamic")
    q = result.manifest["quantization"]
    (node, found), = q["wide_range_inputs"].items()
    assert "LSTM" in node and found["zeroed_share"] > 0.8 and node in q["exclude_nodes"]
    assert 0.7 < q["integer_share"]["integer_mac_share"] < 0.85
    assert result.report.passed and result.report.outputs["output"]["cosine"] > 0.98


@pytest.mark.tflite
def test_the_streaming_model_on_tflite_keeps_its_scalar_input_a_scalar(stream_npz, tmp_path):
    """onnx2tf cannot convert a GRU fed an initial state (its Keras cell rejects the state's shape), so the build
    goes through litert-torch, which turns the rank-0 input into [1]: the manifest and the loader keep it a scalar,
    and the model streams like the ONNX Runtime one."""
    pytest.importorskip("litert_torch")
    pytest.importorskip("tensorflow")
    out = tmp_path / "tfl"
    result = quiet_build(make_cfg(model="edgeexport.models.streaming:model", target="tflite", precision="fp32",
                                  out=str(out), calibration={"path": str(stream_npz), "holdout": 80},
                                  bench={"enabled": False}))
    assert result.manifest["quantization"]["converter"].startswith("litert-torch") and result.report.passed
    assert result.report.stream["pairs"] == {"h": "hn"}
    assert [i["shape"] for i in result.manifest["runtime_config"]["native_inputs"] if i["name"] == "scale"] == [[]]
    run = subprocess.run([sys.executable, str(out / "loader.py"), "--selftest"], capture_output=True, text=True)
    assert run.returncode == 0 and "golden stream step 2 prob" in run.stdout, run.stderr


@pytest.mark.tflite
def test_the_speaker_encoder_reaches_tflite_past_onnx2tfs_reduce_l2_bug(tmp_path):
    """onnx2tf 1.28.8 fails on the encoder's ReduceL2 (its axis arrives as a numpy int64 array): the build names
    that node and converts through litert-torch instead."""
    pytest.importorskip("litert_torch")
    pytest.importorskip("tensorflow")
    from edgeexport.models.speech import package_file, write_speaker_data

    if not package_file("resemblyzer", "pretrained.pt").is_file():
        pytest.skip("resemblyzer is not installed (requirements-models.txt)")
    data = write_speaker_data(tmp_path / "spk.npz", speakers=5, partials=4)
    logs = []
    from edgeexport import pipeline
    from edgeexport.config import parse_input_spec

    result = pipeline.build(make_cfg(model="edgeexport.models.speech:speaker_model", target="tflite",
                                     precision="fp32", out=str(tmp_path / "b"), bench={"enabled": False},
                                     inputs=[parse_input_spec("mels:1x160x40:float32").model_dump()],
                                     calibration={"path": str(data), "holdout": 10}), log=logs.append)
    note = next(line for line in logs if "onnx2tf could not convert" in line)
    assert "ReduceL2" in note and "litert-torch" in note
    assert result.report.passed and result.report.outputs["output"]["kind"] == "embedding"


LSTM_CELL = '''
import torch


class Cell(torch.nn.Module):
    """One step of a 2-layer LSTM with its (h, c) state in and out, as streaming speech models ship."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lstm = torch.nn.LSTM(16, 24, 2)
        self.head = torch.nn.Linear(24, 3)

    def forward(self, x, h0, c0):
        y, (hn, cn) = self.lstm(x[None], (h0, c0))
        return {"scores": self.head(y[0]), "hn": hn, "cn": cn}


def build():
    return {"model": Cell().eval(), "example_inputs": {"x": torch.zeros(1, 16), "h0": torch.zeros(2, 1, 24),
                                                      "c0": torch.zeros(2, 1, 24)}}
'''


def test_an_lstm_step_with_two_state_pairs_streams_both(tmp_path):
    (tmp_path / "cell.py").write_text(LSTM_CELL)
    rng = np.random.default_rng(0)
    n = 240
    x = np.cumsum(rng.standard_normal((n, 1, 16)), axis=0).astype(np.float32) * 0.1  # a slowly varying signal
    starts = np.arange(n) % 40 == 0
    np.savez(tmp_path / "d.npz", x=x, h0=np.zeros((n, 2, 1, 24), np.float32), c0=np.zeros((n, 2, 1, 24), np.float32),
             stream_start=starts)
    result = quiet_build(make_cfg(model=f"{tmp_path / 'cell.py'}:build", precision="int8-dynamic",
                                  out=str(tmp_path / "b"), calibration={"path": str(tmp_path / "d.npz"), "holdout": 80},
                                  target_options={"device": "host"}, bench={"enabled": False}))
    assert result.config.state == {"h0": "hn", "c0": "cn"}
    assert result.report.outputs["scores"]["kind"] == "logits"
    assert {c.output for c in result.report.checks} == {"scores"}
    assert result.manifest["export"]["stream"]["streams"] == 6
    run = subprocess.run([sys.executable, str(tmp_path / "b" / "loader.py"), "--selftest"], capture_output=True,
                         text=True)
    assert run.returncode == 0 and "golden stream step 2 cn" in run.stdout, run.stderr
