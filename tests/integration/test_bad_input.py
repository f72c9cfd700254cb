"""Bad input: each case gets a clear error, exit code 1, no traceback, and nothing written at --out."""

import errno
import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

CUSTOM_OP = '''
import torch

@torch.library.custom_op("edgetest::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2

@mystery.register_fake
def _(x):
    return torch.empty_like(x)

class M(torch.nn.Module):
    def forward(self, x):
        return mystery(x) + 1

def build():
    return M(), (torch.zeros(1, 6),)
'''


ODD_MODELS = '''
import torch

class KeywordOnly(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, *, x):
        return self.fc(x)

class ReturnsText(torch.nn.Module):
    def forward(self, x):
        return x * 2, "done"

class ConvHeavy(torch.nn.Module):  # nearly all of its weights in convolutions, a small Linear head
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv1d(1, 64, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv1d(64, 64, 3, padding=1))
        self.fc = torch.nn.Linear(64, 4)

    def forward(self, x):
        return self.fc(self.conv(x[:, None]).mean(-1))

def keyword_only():
    return KeywordOnly()

def conv_heavy():
    return ConvHeavy()

def returns_text():
    return ReturnsText()
'''


#: The catalogue: (case, exit code, what the error says). docs/errors.md holds the same table, checked below.
CATALOGUE = [
    ("spec does not resolve", 1, "cannot import module"),
    ("file not found", 1, "not found"),
    ("factory name missing", 1, "has no callable 'nope'"),
    ("factory raises", 1, "raised RuntimeError"),
    ("factory returns junk", 1, "not a torch.nn.Module"),
    ("forward raises", 1, "forward raised ValueError"),
    ("unconvertible op", 1, "no ONNX translation for operator edgetest.mystery.default (graph node %mystery)"),
    ("garbage onnx", 1, "is not a valid ONNX model"),
    ("calib names", 1, "do not match the model inputs"),
    ("calib shape", 1, "dimension 1 is 5"),
    ("calib NaN", 1, "NaN or Inf in 1 sample(s), first at index 7"),
    ("calib Inf", 1, "NaN or Inf in 1 sample(s), first at index 3"),
    ("empty image folder", 1, "4-D image input"),
    ("truncated image", 1, "cannot decode image"),
    ("too few samples", 1, "asked for 500 calibration samples but only 48"),
    ("no calibration", 1, "no calibration data given"),
    ("calibration file missing", 1, "does not exist"),
    ("unsupported precision option", 2, "activation_type must be uint8 or int8"),
    ("unknown target", 2, "unknown target 'coreml'"),
    ("unknown precision", 2, "Invalid value for '--precision'"),
    ("not a number", 2, "Invalid value for '--calib-samples'"),
    ("impossible shape", 2, "dimension 0 must be a positive integer"),
    ("malformed YAML config", 2, "is not valid YAML"),
    ("config of the wrong type", 2, "must hold a mapping"),
    ("unknown accuracy budget", 2, "cannot parse --accuracy-budget"),
    ("bad prune spec", 2, "cannot parse --prune 'half'"),
    ("recovery without pruning", 2, "--finetune-steps needs --prune"),
    ("pruning a TorchScript model", 1, "--prune cannot prune a TorchScript model"),
    ("unknown device", 2, "unknown device 'riscv'"),
    ("int8 option on fp32", 2, "recipe apply to --precision int8 only, not fp32"),
    ("excluded node that does not exist", 1, "exclude_nodes names 1 node(s) the graph does not have: no_such_node"),
    ("int16 tensor that does not exist", 1, "int16_tensors names 1 tensor(s) the graph does not have: ghost"),
    ("smoothquant that is not a switch", 2, "smoothquant must be auto, true or false"),
    ("smoothquant given as 1", 2, "smoothquant must be auto, true or false"),
    ("weight rounding the quantizer does not have", 2, "weight_rounding must be gptq or nearest"),
    ("calibration method the target does not have", 2, "target 'tflite' has no entropy calibration"),
    ("op type the graph does not have", 1, "op_types names op type(s) the graph does not have: Foo"),
    ("op type dynamic int8 has no kernel for", 1, "dynamic quantization cannot quantize Relu"),
    ("float labels", 1, "must be class indices: a 1-D integer array (or one-hot rows)"),
    ("labels beyond the model's classes", 1, "labels go up to class 57, but output 'output' has 4 classes"),
    ("constant calibration data", 1, "every sample of"),
    ("too few held-out samples", 1, "validation would use 1 held-out sample(s); at least 10 are needed"),
    ("image preprocessing with arrays", 2, "(--mean) applies to image folders only"),
    ("quantization option on fp32", 2, "exclude_nodes apply to the int8 precisions only, not fp32"),
    ("tolerance out of range", 2, "tolerance cosine=1.5 is out of range: cosine takes values from -1 to 1"),
    ("tolerance NaN", 2, "tolerance cosine=nan is out of range"),
    ("tolerance given as a percentage", 2, "a fraction, not a percentage: did you mean 0.95?"),
    ("zero image size", 2, "is not HxW with two positive integers"),
    ("number out of range", 2, "Invalid value for '--holdout': 0 is not in the range x>=1"),
    ("keyword-only forward", 1, "forward() takes keyword-only argument(s) x"),
    ("forward returns a string", 1, "the model's forward returned str, which is not a tensor"),
    ("folder of array files", 1, "is a folder of array files (a.npz, b.npz), not of images"),
    ("a torch.save pickle for a model", 1, "is a torch.save pickle (a state_dict or a whole pickled module)"),
    ("a TorchScript forward with a Python argument", 1, "forward takes non-tensor argument(s) sr: int"),
    ("state pair naming no output", 2, "--state x=ghost does not name an input and an output of the model"),
    ("unknown output kind", 2, "output kind 'score' (for 'output') is not one of logits, probability"),
    ("output that does not exist", 2, "--output names ['ghost'], which the model does not return"),
    ("state output without its pair", 2, "--output output:state, but no --state pair feeds output back"),
    ("unparseable state pair", 2, "cannot parse --state 'x'"),
    ("data of single numbers only", 1, "holds only single numbers (x)"),
    ("int8 of a model whose layers sit in If branches", 1, "nothing in the built model runs in integers"),
    ("weight-only of a network whose weights are convolutions", 1, "int4-weight would leave most of this model float"),
    ("weight-only option on int8", 2, "block_size apply to --precision int4-weight and int8-weight only"),
    ("text generation from a model that is not a folder", 2, "needs a Hugging Face causal LM folder"),
    ("text generation for TFLite", 1, "--task text-generation is not supported for --target tflite"),
    ("text generation at static int8", 2, "not offered for decoders (int8 is the build's default precision)"),
    ("text generation from an encoder", 1, "holds a BertModel, not a causal language model"),
    ("text generation without a tokenizer", 1, "has no tokenizer.json"),
    ("text generation from array data", 1, "is not a text file"),
    ("a decoder tolerance for another model", 2, "perplexity_change applies to --task text-generation only"),
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory, tiny_model, tiny_npz):
    from PIL import Image

    d = tmp_path_factory.mktemp("bad")
    (d / "custom_op.py").write_text(CUSTOM_OP)
    np.savez(d / "names.npz", wrong=np.zeros((20, 6), np.float32))
    np.savez(d / "shape.npz", x=np.zeros((20, 5), np.float32))
    for name, index, value in (("nan", 7, np.nan), ("inf", 3, np.inf)):
        bad = np.zeros((20, 6), np.float32)
        bad[index, 2] = value
        np.savez(d / f"{name}.npz", x=bad)
    (d / "empty").mkdir()
    (d / "images").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(d / "images" / "a.png")
    png = (d / "images" / "a.png").read_bytes()
    (d / "images" / "b.png").write_bytes(png[: len(png) // 2])  # truncated
    (d / "garbage.onnx").write_bytes(b"\x00not an onnx model")
    (d / "bad.yaml").write_text("model: [unclosed\n  target: ort: x\n")
    (d / "list.yaml").write_text("- model\n- target\n")
    import torch

    torch.jit.save(torch.jit.trace(torch.nn.Linear(6, 4).eval(), torch.zeros(1, 6)), str(d / "linear.pt"))
    torch.save(torch.nn.Linear(6, 4).state_dict(), str(d / "weights.pth"))

    class Detector(torch.nn.Module):  # a voice detector's signature: audio and a sample rate
        def forward(self, x: torch.Tensor, sr: int) -> torch.Tensor:
            return x * (sr / 16000.0)

    torch.jit.script(Detector()).save(str(d / "vad.jit"))
    t = str(tiny_model)
    good = str(tiny_npz)
    img = ["--input", "x:1x3x16x16:float32"]
    np.save(d / "float_labels.npy", np.random.default_rng(0).random(60).astype(np.float32))
    np.save(d / "labels57.npy", np.full(60, 57, np.int64))
    np.savez(d / "constant.npz", x=np.repeat(np.ones((1, 6), np.float32), 40, axis=0))
    np.savez(d / "two.npz", x=np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32))
    np.savez(d / "scalars.npz", x=np.float32(1.5))
    from tests.integration.test_streaming import _if_graph

    _if_graph(d / "branches.onnx")
    np.savez(d / "branches.npz", x=np.random.default_rng(1).standard_normal((60, 1, 16)).astype(np.float32),
             sr=np.int64(16000))
    (d / "arrays").mkdir()
    for name in ("a", "b"):
        np.savez(d / "arrays" / f"{name}.npz", x=np.zeros((20, 6), np.float32))
    (d / "odd.py").write_text(ODD_MODELS)
    import json

    for name, arch in (("encoder", "BertModel"), ("lm", "GPT2LMHeadModel")):
        (d / name).mkdir()
        (d / name / "config.json").write_text(json.dumps({"architectures": [arch], "vocab_size": 100}))
    (d / "text.txt").write_text("Some held-out prose, one paragraph per line, for a decoder's validation.\n")
    gen = ["--task", "text-generation", "--precision", "fp32"]
    return {
        "weight-only of a network whose weights are convolutions": ["--model", str(d / "odd.py") + ":conv_heavy",
                                                                    "--calib", good, "--input", "x:1x6:float32",
                                                                    "--precision", "int4-weight"],
        "weight-only option on int8": ["--model", t + ":build", "--calib", good, "--option", "block_size=64"],
        "text generation from a model that is not a folder": ["--model", t + ":build", "--calib", good, *gen],
        "text generation for TFLite": ["--model", f"hf:{d / 'lm'}", "--calib", str(d / "text.txt"), "--target",
                                       "tflite", *gen],
        "text generation at static int8": ["--model", f"hf:{d / 'lm'}", "--calib", str(d / "text.txt"),
                                           "--task", "text-generation"],
        "text generation from an encoder": ["--model", f"hf:{d / 'encoder'}", "--calib", str(d / "text.txt"), *gen],
        "text generation without a tokenizer": ["--model", f"hf:{d / 'lm'}", "--calib", str(d / "text.txt"), *gen],
        "text generation from array data": ["--model", f"hf:{d / 'lm'}", "--calib", good, *gen],
        "a decoder tolerance for another model": ["--model", t + ":build", "--calib", good, "--tolerance",
                                                  "perplexity_change=0.1"],
        "float labels": ["--model", t + ":build", "--calib", good, "--labels", str(d / "float_labels.npy")],
        "state pair naming no output": ["--model", t + ":build", "--calib", good, "--state", "x=ghost"],
        "unknown output kind": ["--model", t + ":build", "--calib", good, "--output", "output:score"],
        "output that does not exist": ["--model", t + ":build", "--calib", good, "--output", "ghost:logits"],
        "state output without its pair": ["--model", t + ":build", "--calib", good, "--output", "output:state"],
        "unparseable state pair": ["--model", t + ":build", "--calib", good, "--state", "x"],
        "data of single numbers only": ["--model", t + ":build", "--calib", str(d / "scalars.npz"),
                                        "--input", "x::float32"],
        "int8 of a model whose layers sit in If branches": ["--model", str(d / "branches.onnx"), "--calib",
                                                            str(d / "branches.npz"), "--option", "device=host"],
        "labels beyond the model's classes": ["--model", t + ":build", "--calib", good, "--labels",
                                              str(d / "labels57.npy")],
        "constant calibration data": ["--model", t + ":build", "--calib", str(d / "constant.npz")],
        "too few held-out samples": ["--model", t + ":build", "--calib", str(d / "two.npz")],
        "image preprocessing with arrays": ["--model", t + ":build", "--calib", good, "--mean", "0.5"],
        "quantization option on fp32": ["--model", t + ":build", "--calib", good, "--precision", "fp32",
                                        "--option", "exclude_nodes=[no_such_node]"],
        "tolerance out of range": ["--model", t + ":build", "--calib", good, "--tolerance", "cosine=1.5"],
        "tolerance NaN": ["--model", t + ":build", "--calib", good, "--tolerance", "cosine=nan"],
        "tolerance given as a percentage": ["--model", t + ":build", "--calib", good, "--tolerance", "top1=95"],
        "zero image size": ["--model", t + ":build", "--calib", good, "--image-size", "0x0"],
        "number out of range": ["--model", t + ":build", "--calib", good, "--holdout", "0"],
        "keyword-only forward": ["--model", str(d / "odd.py") + ":keyword_only", "--calib", good,
                                 "--input", "x:1x6:float32"],
        "forward returns a string": ["--model", str(d / "odd.py") + ":returns_text", "--calib", good,
                                     "--input", "x:1x6:float32"],
        "folder of array files": ["--model", t + ":build", "--calib", str(d / "arrays")],
        "spec does not resolve": ["--model", "no_such_pkg.models:build", "--calib", good],
        "file not found": ["--model", str(d / "missing.py") + ":build", "--calib", good],
        "factory name missing": ["--model", t + ":nope", "--calib", good],
        "factory raises": ["--model", t + ":raises", "--calib", good],
        "factory returns junk": ["--model", t + ":not_a_module", "--calib", good],
        "forward raises": ["--model", t + ":bad_forward", "--calib", good],
        "unconvertible op": ["--model", str(d / "custom_op.py") + ":build", "--calib", good],
        "garbage onnx": ["--model", str(d / "garbage.onnx"), "--calib", good],
        "calib names": ["--model", t + ":build", "--calib", str(d / "names.npz")],
        "calib shape": ["--model", t + ":build", "--calib", str(d / "shape.npz")],
        "calib NaN": ["--model", t + ":build", "--calib", str(d / "nan.npz")],
        "calib Inf": ["--model", t + ":build", "--calib", str(d / "inf.npz")],
        "empty image folder": ["--model", t + ":build", "--calib", str(d / "empty")],
        "truncated image": ["--model", t + ":build", "--calib", str(d / "images"), *img],
        "too few samples": ["--model", t + ":build", "--calib", good, "--calib-samples", "500"],
        "no calibration": ["--model", t + ":build"],
        "calibration file missing": ["--model", t + ":build", "--calib", str(d / "nothing.npz")],
        "unsupported precision option": ["--model", t + ":build", "--calib", good, "--option", "activation_type=int4"],
        "unknown target": ["--model", t + ":build", "--calib", good, "--target", "coreml"],
        "unknown precision": ["--model", t + ":build", "--calib", good, "--precision", "int4"],
        "not a number": ["--model", t + ":build", "--calib", good, "--calib-samples", "many"],
        "impossible shape": ["--model", t + ":build", "--calib", good, "--input", "x:0x-6:float32"],
        "malformed YAML config": ["-c", str(d / "bad.yaml")],
        "config of the wrong type": ["-c", str(d / "list.yaml")],
        "unknown accuracy budget": ["--model", t + ":build", "--calib", good, "--accuracy-budget", "f1=0.9"],
        "bad prune spec": ["--model", t + ":build", "--calib", good, "--prune", "half"],
        "recovery without pruning": ["--model", t + ":build", "--calib", good, "--finetune-steps", "10"],
        "a torch.save pickle for a model": ["--model", str(d / "weights.pth"), "--calib", good],
        "a TorchScript forward with a Python argument": ["--model", str(d / "vad.jit"), "--calib", good],
        "pruning a TorchScript model": ["--model", str(d / "linear.pt"), "--calib", good, "--input", "x:1x6:float32",
                                        "--prune", "magnitude:0.5"],
        "unknown device": ["--model", t + ":build", "--calib", good, "--option", "device=riscv"],
        "int8 option on fp32": ["--model", t + ":build", "--calib", good, "--precision", "fp32",
                                "--option", "recipe=weighted"],
        "excluded node that does not exist": ["--model", t + ":build", "--calib", good,
                                              "--option", "exclude_nodes=[no_such_node]"],
        "int16 tensor that does not exist": ["--model", t + ":build", "--calib", good,
                                             "--option", "int16_tensors=[ghost]"],
        "smoothquant that is not a switch": ["--model", t + ":build", "--calib", good, "--option", "smoothquant=0.5"],
        "smoothquant given as 1": ["--model", t + ":build", "--calib", good, "--option", "smoothquant=1"],
        "weight rounding the quantizer does not have": ["--model", t + ":build", "--calib", good,
                                                        "--option", "weight_rounding=adaround"],
        "calibration method the target does not have": ["--model", t + ":build", "--calib", good, "--target",
                                                        "tflite", "--calib-method", "entropy"],
        "op type the graph does not have": ["--model", t + ":build", "--calib", good, "--option", "op_types=[Foo]"],
        "op type dynamic int8 has no kernel for": ["--model", t + ":build", "--calib", good, "--precision",
                                                   "int8-dynamic", "--option", "op_types=[Relu]"],
    }


@pytest.mark.parametrize("name,code,message", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_is_a_clear_error(cli, cases, tmp_path, name, code, message):
    out = tmp_path / "out"
    args = cases[name]
    if "--precision" not in args:
        args = [*args, "--precision", "int8"]
    r = cli("build", *args, "--out", out, "--no-bench")
    assert r.exit_code == code, (r.exit_code, r.stderr)
    assert message in r.stderr, r.stderr
    assert ("error:" in r.stderr or "Error:" in r.stderr) and "Traceback" not in r.stderr
    assert "fix:" in r.stderr or code == 2 or name in ("garbage onnx",)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def catalogue_markdown() -> str:
    rows = ["| case | exit code | the error says |", "|---|---|---|"]
    rows += [f"| {name} | {code} | `{message}` |" for name, code, message in CATALOGUE]
    return "\n".join(rows) + "\n"


def test_the_docs_table_is_the_tested_catalogue():
    from tests.conftest import REPO

    doc = (REPO / "docs" / "errors.md").read_text()
    assert catalogue_markdown() in doc, "docs/errors.md is out of date: python -m tests.integration.test_bad_input"


def test_dynamic_op_types_may_name_gemm_layers_matmul(cli, tiny_model, tiny_npz, tmp_path):
    """The op-type check must not refuse what works: onnxruntime's dynamic quantizer rewrites Gemm as MatMul, so
    op_types=[MatMul] on a graph of Gemms quantizes them (and op_types=[Gemm] is the error above)."""
    out = tmp_path / "dyn"
    r = cli("build", "--model", f"{tiny_model}:build", "--calib", tiny_npz, "--precision", "int8-dynamic",
            "--option", "op_types=[MatMul]", "--out", out, "--no-bench")
    assert r.exit_code == 0, r.stderr
    share = json.loads((out / "manifest.json").read_text())["quantization"]["integer_share"]
    assert share["integer_mac_share"] == 1.0


def test_disk_failure_midway_leaves_no_bundle_and_keeps_the_old_one(cli, tiny_model, tiny_npz, tmp_path, monkeypatch):
    out = tmp_path / "b"
    base = ("build", "--model", f"{tiny_model}:build", "--calib", tiny_npz, "--precision", "fp32", "--out", out,
            "--no-bench")
    assert cli(*base).exit_code == 0
    before = (out / "manifest.json").read_text()
    import edgeexport.bundle.writer as writer

    calls = {"n": 0}
    real_savez = np.savez

    def failing_savez(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second golden file: model and loader are already copied
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_savez(*a, **kw)

    monkeypatch.setattr(writer.np, "savez", failing_savez)
    r = cli(*base, "--force")
    assert r.exit_code == 1 and "No space left on device" in r.stderr and "Traceback" not in r.stderr
    assert (out / "manifest.json").read_text() == before  # the previous complete bundle is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no partial or temporary folders left
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(writer.np, "savez", failing_savez)
    calls["n"] = 0
    r = cli(*base[:-3], "--out", fresh, "--no-bench")
    assert r.exit_code == 1 and not fresh.exists()


def test_synthetic_data_is_loud(cli, tiny_model, tmp_path):
    out = tmp_path / "b"
    r = cli("build", "--model", f"{tiny_model}:build", "--calib", "synthetic:60", "--precision", "int8", "--out", out,
            "--no-bench")
    assert r.exit_code == 0, r.stderr
    assert "SYNTHETIC" in r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["calibration"]["synthetic"] is True and any("SYNTHETIC" in n for n in m["notes"])
    assert "SYNTHETIC" in (out / "report.md").read_text()


MASKED_ATTENTION = '''
import torch, torch.nn as nn

class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(8, 8)
        self.register_buffer("mask", torch.triu(torch.full((8, 8), float("-inf")), diagonal=1))

    def forward(self, rows):
        scores = self.q(rows) @ rows.transpose(1, 2) + self.mask
        return torch.softmax(scores, -1) @ rows

def build():
    return {"model": Masked(), "inputs": ["rows:batchx8x8:float32"]}
'''


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_minus_inf_attention_mask_falls_back_with_a_message(cli, rows_npz, tmp_path, method):
    """Histogram calibrators fail on -inf masks: the build says so, keeps those nodes float and still validates."""
    (tmp_path / "masked.py").write_text(MASKED_ATTENTION)
    out = tmp_path / "b"
    r = cli("build", "--model", f"{tmp_path / 'masked.py'}:build", "--calib", rows_npz, "--precision", "int8",
            "--calib-method", method, "--out", out, "--no-bench")
    assert r.exit_code == 0, r.stderr
    assert f"{method} calibration failed" in r.stderr and "used minmax instead" in r.stderr
    assert "kept 2 node(s) in float" in r.stderr
    m = json.loads((out / "manifest.json").read_text())
    q = m["quantization"]
    assert q["calibration_method_requested"] == method and q["calibration_method"] == "minmax"
    assert len(q["exclude_nodes"]) == 2 and any("used minmax" in n for n in m["notes"])


def test_entropy_and_percentile_calibration_on_real_digits(digits_npz, tmp_path):
    from tests.conftest import make_cfg, quiet_build

    for method in ("entropy", "percentile"):
        result = quiet_build(make_cfg(model="edgeexport.models.digits:model", precision="int8",
                                      out=str(tmp_path / method), bench={"enabled": False},
                                      calibration={"path": str(digits_npz), "method": method}))
        assert result.manifest["quantization"]["calibration_method"] == method
        assert not [n for n in result.manifest["notes"] if "calibration failed" in n]  # no fallback
        assert result.report.task["drop_points"] <= 1.0


if __name__ == "__main__":  # regenerate the table in docs/errors.md
    print(catalogue_markdown(), end="")


@pytest.mark.parametrize("name,data", [
    ("spec does not resolve", {"model": "no_such_pkg.models:build"}),
    ("factory raises", {"model": "{t}:raises"}),
    ("forward raises", {"model": "{t}:bad_forward"}),
    ("calib NaN", {"calibration": {"path": "{d}/nan.npz"}}),
    ("calib names", {"calibration": {"path": "{d}/names.npz"}}),
    ("too few samples", {"calibration": {"path": "{good}", "samples": 500}}),
    ("unknown target", {"target": "coreml"}),
    ("unknown precision", {"precision": "int4"}),
    ("impossible shape", {"inputs": [{"name": "x", "shape": [0, -6]}]}),
])
def test_python_api_raises_only_documented_errors(cases, tiny_model, tiny_npz, tmp_path, name, data):
    """The same bad inputs through the Python API: an EdgeExportError subclass saying what the CLI says (or, for
    values the CLI's own parser refuses, the config's own validation), and nothing written."""
    import json

    from edgeexport import pipeline
    from edgeexport.config import make_config
    from edgeexport.errors import EdgeExportError

    folder = str(Path(cases["calib NaN"][-1]).parent)
    text = json.dumps({"model": "{t}:build", "precision": "int8", "out": str(tmp_path / "out"),
                       "calibration": {"path": "{good}"}, **data})
    config = json.loads(text.replace("{t}", str(tiny_model)).replace("{d}", folder).replace("{good}", str(tiny_npz)))
    with pytest.raises(EdgeExportError) as e:
        pipeline.build(make_config(config), log=lambda _m: None)
    message = {"unknown precision": "precision 'int4' is not one of",
               "impossible shape": "shape"}.get(name, dict((c[0], c[2]) for c in CATALOGUE)[name])
    assert message in e.value.render()
    assert not (tmp_path / "out").exists()
