"""Int8 recipes on classes of models built here (not the workloads they were tuned on): small encoders whose
additive attention masks use the fills real exporters use, and a depthwise-separable residual CNN."""

import json

import numpy as np
import onnx
import pytest

pytestmark = pytest.mark.slow

ENCODER = '''
import torch
import torch.nn as nn

FILL = {fill}
PRE_LN = {pre_ln}
OUTLIER = {outlier}


class Block(nn.Module):
    """Post-LayerNorm (BERT) or pre-LayerNorm block. With OUTLIER > 1 the LayerNorm gains carry a few large
    channels, compensated in the next weights: the float function is that of a plain block, but the MatMuls'
    inputs have the outlier channels of real encoders."""

    def __init__(self, d, heads):
        super().__init__()
        self.h, self.dk = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        if OUTLIER != 1:
            with torch.no_grad():
                for norm, users in ((self.n1, (self.q, self.k, self.v)), (self.n2, (self.ff1,))):
                    norm.weight[:4] *= OUTLIER
                    norm.bias[:4] *= OUTLIER
                    for lin in users:
                        lin.weight[:, :4] /= OUTLIER

    def split(self, x):
        b, s, _ = x.shape
        return x.view(b, s, self.h, self.dk).transpose(1, 2)

    def forward(self, x, bias):
        h = self.n1(x) if PRE_LN else x
        q, k, v = self.split(self.q(h)), self.split(self.k(h)), self.split(self.v(h))
        scores = q @ k.transpose(-1, -2) / self.dk ** 0.5 + bias
        ctx = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(x.shape)
        if PRE_LN:
            x = x + self.o(ctx)
            return x + self.ff2(torch.nn.functional.gelu(self.ff1(self.n2(x))))
        x = self.n1(x + self.o(ctx))
        return self.n2(x + self.ff2(torch.nn.functional.gelu(self.ff1(x))))


class Encoder(nn.Module):
    def __init__(self, vocab=300, d=64, heads=4, layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(1, 32, d) * 0.1)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))

    def forward(self, input_ids, attention_mask):
        x = self.emb(input_ids) + self.pos
        pad = attention_mask[:, None, None, :] == 0
        bias = torch.where(pad, torch.tensor(FILL), torch.tensor(0.0))  # the exporters' additive mask
        for b in self.blocks:
            x = b(x, bias)
        m = attention_mask[..., None].float()
        return (x * m).sum(1) / m.sum(1)


def build():
    return {{"model": Encoder().eval(), "inputs": ["input_ids:1x32:int64", "attention_mask:1x32:int64"]}}
'''
#: a pre-LayerNorm encoder whose LayerNorm gains carry 40x channels (compensated in the next weights)
PRE_LN_OUTLIERS = ENCODER.format(fill="-1e4", pre_ln=True, outlier=40.0)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """Token ids of real English sentences (hashed words), padded to 32 with their attention masks."""
    from edgeexport.models.sentences import sentences

    ids, masks = [], []
    for s in sentences(160):
        words = [sum(map(ord, w)) % 299 + 1 for w in s.split()][:32]
        ids.append(words + [0] * (32 - len(words)))
        masks.append([1] * len(words) + [0] * (32 - len(words)))
    path = tmp_path_factory.mktemp("tok") / "tokens.npz"
    np.savez(path, input_ids=np.array(ids, np.int64), attention_mask=np.array(masks, np.int64))
    return path


@pytest.mark.parametrize("fill", ["torch.finfo(torch.float32).min", "-1e4"])
def test_encoders_with_additive_masks_keep_their_embeddings_at_int8(cli, tokens, tmp_path, fill):
    """The mask's sentinel would squeeze every real attention score onto the zero point; it stays float, the
    transformer recipe quantizes the weighted MatMuls, and the embedding survives."""
    (tmp_path / "enc.py").write_text(ENCODER.format(fill=fill, pre_ln=False, outlier=1.0))
    out = tmp_path / "b"
    r = cli("build", "--model", f"{tmp_path / 'enc.py'}:build", "--calib", tokens, "--precision", "int8",
            "--out", out, "--no-bench", "--task", "feature-extraction")  # a sentence embedding: no argmax check
    assert r.exit_code == 0, r.stderr
    assert "sentinel values" in r.stderr
    m = json.loads((out / "manifest.json").read_text())
    q = m["quantization"]
    assert q["graph_family"] == "transformer" and q["recipe"] == "weighted"
    assert any("Softmax" in n or "softmax" in n for n in q["exclude_nodes"]) or q["exclude_nodes"]
    cos = next(c["value"] for c in m["validation"]["checks"] if c["metric"] == "cosine")
    assert cos >= 0.99, cos
    share = q["integer_share"]
    assert share["integer_weight_share"] == 1.0 and 0.5 < share["integer_mac_share"] < 1.0  # scores stay float
    graph = onnx.load(str(out / "model.onnx")).graph
    weighted = [n for n in graph.node if n.op_type == "MatMul"]
    assert sum(1 for n in graph.node if n.op_type == "DequantizeLinear") >= 12 and weighted


def _snr(out):
    m = json.loads((out / "manifest.json").read_text())
    return m, next(c["value"] for c in m["validation"]["checks"] if c["metric"] == "snr_db")


@pytest.mark.parametrize("precision", ["int8", "int8-dynamic"])
def test_smoothquant_moves_layernorm_outlier_channels_into_the_weights(cli, tokens, tmp_path, precision):
    """A pre-LayerNorm encoder whose LayerNorm gains carry 40x channels (compensated in the next weights, so the
    float function is ordinary): one 8-bit range per MatMul input spends its levels on four channels. SmoothQuant,
    on by default for transformers, gets the embedding back; switched off, the same build loses >10 dB."""
    (tmp_path / "enc.py").write_text(PRE_LN_OUTLIERS)
    spec = f"{tmp_path / 'enc.py'}:build"
    r = cli("build", "--model", spec, "--calib", tokens, "--precision", precision, "--out", tmp_path / "on",
            "--no-bench", "--task", "feature-extraction")
    assert r.exit_code == 0, r.stderr
    m, smoothed = _snr(tmp_path / "on")
    sq = m["quantization"]["smoothquant"]
    assert sq["smoothed_matmuls"] == 12 and sq["activation_tensors"] >= 4, sq  # q/k/v/o/ff1/ff2 of both blocks
    r = cli("build", "--model", spec, "--calib", tokens, "--precision", precision, "--out", tmp_path / "off",
            "--no-bench", "--task", "feature-extraction", "--option", "smoothquant=false",
            "--tolerance", "cosine=0", "--tolerance", "snr_db=0")
    assert r.exit_code == 0, r.stderr
    m_off, plain = _snr(tmp_path / "off")
    assert m_off["quantization"]["smoothquant"] is False
    assert smoothed > plain + 10, (smoothed, plain)


def test_tensorrt_qdq_graph_of_an_encoder_gets_the_transformer_recipe(cli, tokens, tmp_path):
    """TensorRT's Q/DQ placement (symmetric int8 on the inputs of weighted ops) with the transformer recipe: only
    the MatMuls with constant weights get Q/DQ, attention's score and context MatMuls stay float, SmoothQuant on."""
    (tmp_path / "enc.py").write_text(PRE_LN_OUTLIERS)
    out = tmp_path / "trt"
    r = cli("build", "--target", "trt", "--model", f"{tmp_path / 'enc.py'}:build", "--calib", tokens,
            "--precision", "int8", "--out", out, "--task", "feature-extraction")
    assert r.exit_code == 0, r.stderr
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    assert q["recipe"] == "weighted" and q["graph_family"] == "transformer"
    assert q["smoothquant"]["smoothed_matmuls"] == 12
    graph = onnx.load(str(out / "model.onnx")).graph
    consts = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    for n in graph.node:
        if n.op_type == "MatMul":
            weighted = any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
                           and producer[i].input[0] in consts for i in n.input)
            fed_by_dq = [producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input]
            assert weighted or not any(fed_by_dq), n.name  # activation x activation MatMuls get no Q/DQ


SEPARABLE = '''
import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.pw(self.dw(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU6())
        self.blocks = nn.Sequential(Block(24), Block(24), Block(24))
        self.head = nn.Linear(24, 10)

    def forward(self, image):
        return self.head(self.blocks(self.stem(image)).mean((2, 3)))


def build():
    from edgeexport.models.digits import fit, load_data

    torch.manual_seed(0)
    x, y, _, _ = load_data()
    torch.set_num_threads(1)  # the same trained weights whatever threads the process had set before
    return {"model": fit(Net(), x, y, epochs=40, lr=3e-3).eval(), "example_inputs": {"image": torch.zeros(1, 1, 8, 8)}}
'''


def test_a_depthwise_residual_cnn_is_bias_corrected_and_fully_integer(cli, digits_npz, tmp_path):
    (tmp_path / "sep.py").write_text(SEPARABLE)
    out = tmp_path / "b"
    r = cli("build", "--model", f"{tmp_path / 'sep.py'}:build", "--calib", digits_npz, "--precision", "int8",
            "--out", out, "--no-bench")
    assert r.exit_code == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    q = m["quantization"]
    assert q["graph_family"] == "cnn" and q["recipe"] == "full" and q["reduce_range"] is False
    assert q["bias_corrected_layers"] >= 7 and q["unquantized_outputs_of"] == ["Gemm"]
    assert q["weight_rounding"] == "gptq" and q["gptq_layers"] >= 7
    assert q["calibration_method"] == "percentile" and q["calibration_method_requested"] == "auto"
    assert q["integer_share"]["integer_mac_share"] == 1.0
    assert m["validation"]["passed"] and m["validation"]["task"]["drop_points"] <= 1.0
    assert m["validation"]["task"]["reference_accuracy"] >= 0.95  # a trained model, not near-ties everywhere
    assert "integer: 100.0% of the multiply-adds" in r.stderr


def test_device_preset_sets_the_weight_range_and_says_why(cli, digits_npz, tmp_path):
    out = tmp_path / "avx2"
    r = cli("build", "--model", "edgeexport.models.digits:model", "--calib", digits_npz, "--precision", "int8",
            "--option", "device=x86-avx2", "--out", out, "--no-bench")
    assert r.exit_code == 0, r.stderr
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    assert q["device"] == "x86-avx2" and q["reduce_range"] is True and "VPMADDUBSW" in q["reduce_range_reason"]
    r = cli("build", "--model", "edgeexport.models.digits:model", "--calib", digits_npz, "--precision", "int8",
            "--option", "device=x86-avx2", "--option", "reduce_range=false", "--out", tmp_path / "o", "--no-bench")
    q = json.loads((tmp_path / "o" / "manifest.json").read_text())["quantization"]
    assert q["reduce_range"] is False and q["reduce_range_reason"] == "set by --option reduce_range"


RECURRENT = '''
import torch
import torch.nn as nn


class RowLSTM(nn.Module):
    """Reads each 8x8 digit as 8 rows of 8 pixels: two LSTM layers, then a linear classifier."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 64, 2, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, rows):
        _, (h, _) = self.lstm(rows)
        return self.head(h[-1])


def build():
    from edgeexport.models.digits import fit, load_data

    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, y, _, _ = load_data()
    net = fit(RowLSTM(), x.reshape(-1, 8, 8), y, epochs=15, lr=3e-3).eval()
    return {"model": net, "inputs": ["rows:1x8x8:float32"]}
'''


def test_recurrent_layers_are_quantized_by_int8_dynamic_and_static_says_they_stayed_float(cli, rows_npz, tmp_path):
    """torch.onnx builds LSTM weights with Unsqueeze nodes; onnxruntime's dynamic quantizer skips LSTMs whose
    weights are not initializers, silently. The graph is constant-folded first, so they are quantized; static
    Q/DQ has no LSTM kernel, and the build says plainly that most of the work stayed float."""
    (tmp_path / "lstm.py").write_text(RECURRENT)
    spec = f"{tmp_path / 'lstm.py'}:build"
    r = cli("build", "--model", spec, "--calib", rows_npz, "--precision", "int8-dynamic", "--out", tmp_path / "dyn",
            "--no-bench")
    assert r.exit_code == 0, r.stderr
    m = json.loads((tmp_path / "dyn" / "manifest.json").read_text())
    ops = [n.op_type for n in onnx.load(str(tmp_path / "dyn" / "model.onnx")).graph.node]
    assert ops.count("DynamicQuantizeLSTM") == 2 and "LSTM" not in ops  # one node per LSTM layer, both int8
    share = m["quantization"]["integer_share"]
    assert share["float_weighted_layers"] == 0 and share["integer_mac_share"] == 1.0  # the head counts too
    assert m["validation"]["passed"] and m["validation"]["task"]["reference_accuracy"] >= 0.9
    r = cli("build", "--model", spec, "--calib", rows_npz, "--precision", "int8", "--out", tmp_path / "st",
            "--no-bench")
    assert r.exit_code == 0, r.stderr
    share = json.loads((tmp_path / "st" / "manifest.json").read_text())["quantization"]["integer_share"]
    assert share["integer_mac_share"] < 0.5 and "stayed float" in r.stderr


def test_openvino_int8_says_when_recurrent_layers_stayed_float(cli, rows_npz, tmp_path):
    """The OpenVINO count includes LSTMSequence ops: the multiply-adds of float LSTMs are not hidden behind an
    int8 head."""
    pytest.importorskip("nncf", reason="needs the [openvino] extra")
    (tmp_path / "lstm.py").write_text(RECURRENT)
    r = cli("build", "--target", "openvino", "--model", f"{tmp_path / 'lstm.py'}:build", "--calib", rows_npz,
            "--precision", "int8", "--out", tmp_path / "ov", "--no-bench")
    assert r.exit_code == 0, r.stderr
    share = json.loads((tmp_path / "ov" / "manifest.json").read_text())["quantization"]["integer_share"]
    assert share["integer_mac_share"] < 0.5 and share["float_weighted_layers"] == 2 and "stayed float" in r.stderr
    assert all(name.startswith("LSTMSequence") for name in share["float_layers_sample"])


def test_a_build_machine_whose_int8_kernels_saturate_validates_what_the_device_computes(cli, digits_npz, tmp_path,
                                                                                        monkeypatch):
    """On an x86 CPU with AVX2 but no VNNI (simulated through EDGEEXPORT_CPU_FLAGS; real on some build machines),
    onnxruntime's int8 kernels saturate full 8-bit weights, which the bundle's device (generic: ARM64, VNNI) does
    not: the build validates the Q/DQ graph as written, says so, and the loader does the same on such a CPU."""
    import subprocess
    import sys

    monkeypatch.setenv("EDGEEXPORT_CPU_FLAGS", "fpu sse4_2 avx avx2 fma")
    out = tmp_path / "generic"
    r = cli("build", "--model", "edgeexport.models.digits:model", "--calib", digits_npz, "--precision", "int8",
            "--out", out, "--bench-runs", "5")
    assert r.exit_code == 0, r.stderr
    assert "VNNI" in r.stderr and "as written" in r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["runtime_config"]["int8"] == {"weight_bits": 8, "qdq": True}
    assert "as written" in m["validation"]["runtime"] and "VNNI" in m["quantization"]["build_machine_int8"]
    assert "int8 kernels" in m["benchmark"]["note"]  # timed natively, for speed only
    selftest = subprocess.run([sys.executable, str(out / "loader.py"), "--selftest"], capture_output=True, text=True)
    assert selftest.returncode == 0 and "runs as written" in selftest.stderr, selftest.stderr
    # 7-bit weights (the preset for such CPUs) cannot saturate: their own kernels validate them
    r = cli("build", "--model", "edgeexport.models.digits:model", "--calib", digits_npz, "--precision", "int8",
            "--option", "device=x86-avx2", "--out", tmp_path / "avx2", "--no-bench")
    assert r.exit_code == 0, r.stderr
    m = json.loads((tmp_path / "avx2" / "manifest.json").read_text())
    assert m["runtime_config"]["int8"]["weight_bits"] == 7 and "as written" not in m["validation"]["runtime"]
    assert "exactly" in m["quantization"]["build_machine_int8"]


SPECTRUM = '''
import numpy as np
import torch
import torch.nn as nn

F, T = 24, 12
#: feature j of a raw power spectrum sits near 10^-DECADES[j]: 7 decades between the loudest and the quietest bin
DECADES = np.linspace(0, 7, F)


def spectra(n, seed=0):
    rng = np.random.default_rng(seed)
    return (10.0 ** -DECADES * rng.lognormal(0, 0.5, (n, T, F))).astype(np.float32)


class Net(nn.Module):
    """Reads raw power spectra whose bins span 7 decades; its first layer weighs each bin by its scale, so the quiet
    bins matter as much as the loud ones (what a model trained on such input learns)."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.first = {"mlp": nn.Linear(F, 32), "conv": nn.Conv1d(F, 32, 3), "lstm": nn.LSTM(F, 32, batch_first=True)}[kind]
        with torch.no_grad():
            scale = torch.tensor(10.0 ** DECADES, dtype=torch.float32)
            for name, p in self.first.named_parameters():
                if name.startswith("weight_ih") or name == "weight":
                    p.mul_(scale.view(1, F, *([1] * (p.dim() - 2))) / (4.0 if kind == "lstm" else 1.0))
        self.head = nn.Linear(32, 10)

    def forward(self, x):  # x: [batch, T, F]
        if self.kind == "mlp":
            h = torch.relu(self.first(x)).mean(1)
        elif self.kind == "conv":
            h = torch.relu(self.first(x.transpose(1, 2))).mean(2)
        else:
            h = self.first(x)[0][:, -1]
        return self.head(h)


def mlp():
    return {"model": Net("mlp").eval(), "inputs": [f"x:batchx{T}x{F}:float32"]}


def conv():
    return {"model": Net("conv").eval(), "inputs": [f"x:batchx{T}x{F}:float32"]}


def lstm():
    return {"model": Net("lstm").eval(), "inputs": [f"x:batchx{T}x{F}:float32"]}
'''


@pytest.mark.parametrize("kind,precision", [("mlp", "int8"), ("conv", "int8"), ("mlp", "int8-dynamic"),
                                            ("lstm", "int8-dynamic")])
def test_a_layer_reading_a_raw_power_spectrum_stays_float(cli, tmp_path, kind, precision):
    """A power spectrum spans decades: one 8-bit range over it rounds most of its bins to zero (resemblyzer's speaker
    encoder: 87% of its mel values; embedding cosine 0.75 at int8-dynamic). The layer reading it stays float, the
    note says why and what would let it quantize, the rest stays int8; forcing it to int8 is refused by the gate."""
    import importlib.util

    (tmp_path / "spectrum.py").write_text(SPECTRUM)
    spec_ = importlib.util.spec_from_file_location("spectrum_data", tmp_path / "spectrum.py")
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    np.savez(tmp_path / "spectra.npz", x=mod.spectra(160))
    model = f"{tmp_path / 'spectrum.py'}:{kind}"
    args = ("build", "--model", model, "--calib", tmp_path / "spectra.npz", "--precision", precision, "--no-bench")
    r = cli(*args, "--out", tmp_path / "b")
    assert r.exit_code == 0, r.stderr
    q = json.loads((tmp_path / "b" / "manifest.json").read_text())["quantization"]
    (node, found), = q["wide_range_inputs"].items()
    assert found["zeroed_share"] > 0.5 and node in q["exclude_nodes"] and "orders of magnitude" in r.stderr
    assert 0 < q["integer_share"]["integer_mac_share"] < 1  # the head is int8, the first layer float
    r = cli(*args, "--option", "wide_range_float=false", "--out", tmp_path / "forced")
    assert r.exit_code == 1 and not (tmp_path / "forced").exists(), r.stderr
