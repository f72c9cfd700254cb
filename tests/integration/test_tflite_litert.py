"""The TFLite target's second converter, litert-torch (PyTorch -> torch.export -> .tflite): chosen by itself where
onnx2tf cannot convert a BERT (built here from a config with random weights, not the MiniLM it was measured on),
asked for on a CNN, and refused where it cannot do what was asked."""

import json

import numpy as np
import pytest

pytest.importorskip("onnx2tf", reason="needs the [tflite] extra")
pytest.importorskip("litert_torch", reason="needs requirements-litert.txt")
pytestmark = [pytest.mark.slow, pytest.mark.tflite]

from edgeexport.bundle import loader  # noqa: E402

SEQ = 32
BERT_INPUTS = ("--input", f"input_ids:1x{SEQ}:int64", "--input", f"attention_mask:1x{SEQ}:int64",
               "--input", f"token_type_ids:1x{SEQ}:int64")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT (hidden 64, 4 heads, intermediate 128) with MiniLM's tokenizer."""
    from tests.conftest import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert", 2, 128, seed=1)


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    from edgeexport.models.sentences import write_sentences

    root = tmp_path_factory.mktemp("data")
    return write_sentences(root / "calib.txt", 48), write_sentences(root / "val.txt", 24, skip=48)


def _bert(cli, tiny_bert, sentences, out, *extra):
    calib, val = sentences
    return cli("build", "--target", "tflite", "--model", f"hf:{tiny_bert}", "--calib", calib, "--val", val,
               *BERT_INPUTS, "--out", out, "--no-bench", *extra)


def test_a_bert_onnx2tf_cannot_convert_goes_through_litert_torch(cli, tiny_bert, sentences, tmp_path):
    out = tmp_path / "fp32"
    r = _bert(cli, tiny_bert, sentences, out, "--precision", "fp32")
    assert r.exit_code == 0, r.stderr
    assert "onnx2tf could not convert the graph" in r.stderr and "converted with litert-torch" in r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["quantization"]["converter"].startswith("litert-torch")
    assert m["runtime_config"]["signature"]["inputs"]["input_ids"] == "args_0"
    assert m["validation"]["passed"]
    assert m["validation"]["outputs"]["last_hidden_state"]["cosine_unpadded"] > 0.9999
    model = loader.load(out)
    assert model.selftest(verbose=False)
    ids = np.full((1, SEQ), 101, np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    y = model(feeds)["last_hidden_state"]
    assert y.shape == (1, SEQ, 64) and np.isfinite(y).all()
    with pytest.raises(loader.BundleError, match="outside int32"):
        model({**feeds, "input_ids": np.full((1, SEQ), 2**40, np.int64)})


def test_dynamic_range_and_fp16_through_litert_torch(cli, tiny_bert, sentences, tmp_path):
    sizes = {}
    for precision in ("fp16", "dynamic-range"):
        out = tmp_path / precision
        r = _bert(cli, tiny_bert, sentences, out, "--precision", precision, "--option", "converter=litert-torch")
        assert r.exit_code == 0, r.stderr
        assert "onnx2tf could not convert" not in r.stderr  # asked for up front: onnx2tf was not tried
        m = json.loads((out / "manifest.json").read_text())
        q = m["quantization"]
        assert q["converter"].startswith("litert-torch") and q["quantizer"].startswith("ai-edge-quantizer")
        assert m["validation"]["passed"] and loader.load(out).selftest(verbose=False)
        assert q["activation_dtypes"] == ["float32"] or set(q["activation_dtypes"]) <= {"float32", "int32", "bool"}
        sizes[precision] = (out / m["model_file"]).stat().st_size
        if precision == "fp16":
            assert "float16" in q["constant_dtypes"]
        else:
            assert "int8" in q["constant_dtypes"]
    assert sizes["dynamic-range"] < sizes["fp16"]


def test_a_cnn_through_litert_torch_keeps_its_layout(cli, digits_npz, tmp_path):
    out = tmp_path / "cnn"
    r = cli("build", "--target", "tflite", "--model", "edgeexport.models.digits:model", "--calib", digits_npz,
            "--precision", "fp32", "--option", "converter=litert-torch", "--out", out, "--no-bench")
    assert r.exit_code == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["runtime_config"]["input_perm"] == {} and m["validation"]["passed"]
    model = loader.load(out)
    assert model(np.zeros((1, 1, 8, 8), np.float32))["output"].shape == (1, 10)


def test_what_litert_torch_cannot_do_is_refused_before_building(cli, digits_npz, tmp_path):
    model = "edgeexport.models.digits:model"
    r = cli("build", "--target", "tflite", "--model", model, "--calib", digits_npz, "--precision", "int8",
            "--option", "converter=litert-torch", "--out", tmp_path / "a")
    assert r.exit_code == 2 and "full-integer int8 is not built through litert-torch" in r.stderr
    assert "converter=onnx2tf" in r.stderr and not (tmp_path / "a").exists()
    r = cli("build", "--target", "tflite", "--model", model, "--calib", digits_npz, "--precision", "fp32",
            "--option", "converter=tf2onnx", "--out", tmp_path / "b")
    assert r.exit_code == 2 and "converter must be auto, onnx2tf or litert-torch" in r.stderr
    r = cli("build", "--target", "tflite", "--model", model, "--calib", digits_npz, "--precision", "fp32",
            "--option", "converter=litert-torch", "--io-dtype", "int8", "--out", tmp_path / "c")
    assert r.exit_code == 2 and "apply to the onnx2tf converter" in r.stderr


def test_an_onnx_file_cannot_go_through_litert_torch(cli, digits_npz, tmp_path):
    import torch

    from edgeexport.models.digits import model as digits_model

    onnx_file = tmp_path / "digits.onnx"
    torch.onnx.export(digits_model()["model"], (torch.zeros(1, 1, 8, 8),), str(onnx_file), input_names=["image"],
                      output_names=["output"], dynamo=True, external_data=False)
    out = tmp_path / "b"
    r = cli("build", "--target", "tflite", "--model", onnx_file, "--calib", digits_npz, "--precision", "fp32",
            "--option", "converter=litert-torch", "--out", out, "--no-bench")
    assert r.exit_code == 1 and "starts from PyTorch" in r.stderr and "converter=onnx2tf" in r.stderr
    assert not out.exists()


def test_int8_of_a_model_onnx2tf_cannot_convert_names_both_converters(cli, tiny_bert, sentences, tmp_path):
    out = tmp_path / "int8"
    r = _bert(cli, tiny_bert, sentences, out, "--precision", "int8")
    assert r.exit_code == 1 and "onnx2tf could not convert the model" in r.stderr
    assert "the other converter, litert-torch, cannot: full-integer int8" in r.stderr
    assert not out.exists()


def test_a_dynamic_text_model_is_told_the_static_shape_that_fits_its_data(cli, tiny_bert, sentences, tmp_path):
    calib, _ = sentences
    r = cli("build", "--target", "tflite", "--model", f"hf:{tiny_bert}", "--calib", calib, "--max-length", "24",
            "--precision", "fp32", "--out", tmp_path / "b")
    assert r.exit_code == 2 and "static shapes" in r.stderr
    assert "--input input_ids:1x24:int64" in r.stderr and "--input attention_mask:1x24:int64" in r.stderr
