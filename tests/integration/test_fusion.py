"""Transformer fusion on the ORT target (fp32, fp16): a BERT built here from a config (random weights, not the
MiniLM it was measured on), a hand-written encoder the optimizer may not know, a CNN, and the options' errors."""

import json

import onnx
import pytest

pytestmark = pytest.mark.slow

LAYERS = 3


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 3-layer BERT (hidden 64, 4 heads, intermediate 96) with MiniLM's tokenizer."""
    from tests.conftest import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert", LAYERS, 96)


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    from edgeexport.models.sentences import write_sentences

    return write_sentences(tmp_path_factory.mktemp("data") / "sentences.txt", 60)


def _build(cli, model, data, out, *extra):
    r = cli("build", "--target", "ort", "--model", model, "--calib", data, "--input", "input_ids:1x32:int64",
            "--input", "attention_mask:1x32:int64", "--input", "token_type_ids:1x32:int64", "--out", out,
            "--no-bench", *extra)
    return r


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_bert_is_fused_and_validated(cli, tiny_bert, sentences, tmp_path, precision):
    out = tmp_path / precision
    r = _build(cli, f"hf:{tiny_bert}", sentences, out, "--precision", precision, "--option", "fusion=auto")
    assert r.exit_code == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    q = m["quantization"]
    assert q["fusion"] == "bert" and q["fusion_requested"] == "auto"
    assert q["fused_ops"]["Attention"] == LAYERS and q["fused_ops"]["EmbedLayerNormalization"] == 1
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"Attention", "EmbedLayerNormalization"} <= ops and "Softmax" not in ops
    assert set(q["contrib_ops"]) >= {"Attention", "EmbedLayerNormalization"}
    assert m["validation"]["passed"]
    cosine = min(o["cosine"] for o in m["validation"]["outputs"].values())
    assert cosine >= (0.9999 if precision == "fp32" else 0.999)


def test_by_default_the_graph_ships_as_exported_and_says_why(cli, tiny_bert, sentences, tmp_path):
    out = tmp_path / "plain"
    r = _build(cli, f"hf:{tiny_bert}", sentences, out, "--precision", "fp32")
    assert r.exit_code == 0, r.stderr
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    assert q["fusion"] == "none" and q["fusion_requested"] == "none" and "no faster" in q["fusion_reason"]
    graph = onnx.load(str(out / "model.onnx")).graph
    assert not [n for n in graph.node if n.domain == "com.microsoft"] and "Softmax" in {n.op_type for n in graph.node}


def test_auto_leaves_cnns_unfused(cli, digits_npz, tmp_path):
    out = tmp_path / "cnn"
    r = cli("build", "--model", "edgeexport.models.digits:model", "--calib", digits_npz, "--precision", "fp32",
            "--option", "fusion=auto", "--out", out, "--no-bench")
    assert r.exit_code == 0, r.stderr
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    assert q["fusion"] == "none" and q["fusion_reason"] == "not a transformer graph"


@pytest.mark.parametrize("args, message", [
    (["--precision", "int8", "--option", "fusion=bert"], "fusion=bert applies to --precision fp32 and fp16"),
    (["--precision", "fp32", "--option", "fusion=gpt2"], "fusion must be auto, bert or none"),
])
def test_fusion_options_that_cannot_apply_are_refused(cli, digits_npz, tmp_path, args, message):
    r = cli("build", "--model", "edgeexport.models.digits:model", "--calib", digits_npz, *args,
            "--out", tmp_path / "x", "--no-bench")
    assert r.exit_code == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()


def test_an_encoder_the_optimizer_may_not_know_builds_either_way(cli, tmp_path):
    """The hand-written encoder of the int8 tests: fused or not, it builds, validates and says which."""
    import numpy as np

    from tests.integration.test_int8_recipes import ENCODER

    (tmp_path / "enc.py").write_text(ENCODER.format(fill="float('-inf')", pre_ln=True, outlier=1))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 300, (80, 32)).astype(np.int64)
    mask = np.ones((80, 32), np.int64)
    mask[:, 24:] = 0
    np.savez(tmp_path / "tok.npz", input_ids=ids, attention_mask=mask)
    out = tmp_path / "enc"
    r = cli("build", "--model", f"{tmp_path / 'enc.py'}:build", "--calib", tmp_path / "tok.npz", "--precision",
            "fp32", "--option", "fusion=bert", "--out", out, "--no-bench", "--task", "feature-extraction")
    assert r.exit_code == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    q = m["quantization"]
    assert q["fusion"] in ("bert", "none") and m["validation"]["passed"]
    if q["fusion"] == "none":
        assert "exported unfused" in q["fusion_reason"] and "fusion:" in r.stderr
