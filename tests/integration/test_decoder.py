"""Decoders with a KV cache (--task text-generation): the GPT-2 trained here on pydoc_data.topics at every
precision, a Llama-style decoder of another shape (MatMul layers, grouped-query attention, rotary positions), the
bundle's generate() and self-test, the gate, and the bad inputs."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeexport.errors import (CalibrationError, ConfigError, EdgeExportError, ModelLoadError, TargetError,
                               ValidationFailed)
from tests.conftest import make_cfg, quiet_build

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def gpt2_dir():
    from edgeexport.models.decoder import decoder_path

    return decoder_path()  # trained once (about 3 minutes on 2 cores), then cached in build/cache


@pytest.fixture(scope="session")
def held_txt(tmp_path_factory):
    from edgeexport.models.decoder import held_out_text

    path = tmp_path_factory.mktemp("text") / "held.txt"
    path.write_text("\n".join(" ".join(t.split()) for t in held_out_text()) + "\n", encoding="utf-8")
    return path


def save_llama(out: Path, tokenizer_dir: str, vocab: int = 2048, seed: int = 0) -> Path:
    """A small Llama-style decoder (random weights) with the trained decoder's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0,
                      eos_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).eval().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(tokenizer_dir) / name, out / name)
    return out


@pytest.fixture(scope="session")
def llama_dir(gpt2_dir, tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("llama"), gpt2_dir)


def _cfg(model_dir, precision, out, held, **kw):
    return make_cfg(model=f"hf:{model_dir}", task="text-generation", precision=precision, out=str(out),
                    calibration={"path": str(held)}, bench={"enabled": False}, **kw)


def test_the_trained_decoder_learned_the_text(gpt2_dir):
    info = json.loads((Path(gpt2_dir) / "training.json").read_text())
    assert 1.5e6 < info["parameters"] < 5e6
    # uniform guessing over the 2,048-token vocabulary is perplexity 2,048: the model learned English prose
    assert info["held_out_perplexity"] < 200


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8-weight", "int4-weight", "int8-dynamic"])
def test_gpt2_builds_validates_and_generates(precision, gpt2_dir, held_txt, tmp_path):
    out = tmp_path / "b"
    result = quiet_build(_cfg(gpt2_dir, precision, out, held_txt))
    m = result.manifest
    gen = m["validation"]["generation"]
    assert result.report.passed and m["task"] == "text-generation" and m["precision"] == precision
    assert gen["decisive_positions"] > 1000 and gen["next_token_top1"] is not None
    assert gen["perplexity_change"] <= 0.05 and gen["kl_divergence"] <= 0.05
    q = m["quantization"]
    if precision.endswith("-weight"):
        assert q["quantized_matmuls"] == 17 and q["float_weight_matmuls"] == 0 and q["gemms_split"] == 16
        assert q["weight_bits"] == int(precision[3]) and q["block_size"] == 32
        # the lm_head (the layer producing the logits) stays at 8 bits; the token table stays float
        assert q["output_layers"] == ["/lm_head/MatMul"] and q["embeddings"] == "float"
        assert q["matmuls_by_bits"] == ({"4": 16, "8": 1} if precision == "int4-weight" else {"8": 17})
    size = (out / "model.onnx").stat().st_size
    assert size < {"int4-weight": 0.35, "int8-weight": 0.5}.get(precision, 1.1) * 10.7e6
    assert (out / "tokenizer" / "tokenizer.json").is_file() and len(m["generation"]["golden"]) == 3
    st = subprocess.run([sys.executable, str(out / "loader.py"), "--selftest"], capture_output=True, text=True)
    assert st.returncode == 0 and "golden continuation 2: 16 tokens ok" in st.stdout, st.stdout + st.stderr

    from edgeexport.bundle.loader import load

    model = load(out)
    prompt = "The import statement"
    greedy = model.generate(prompt, max_new_tokens=12, stop=False)
    again = model.generate(prompt, max_new_tokens=12, stop=False)
    assert isinstance(greedy, str) and greedy == again and greedy.strip()
    ids = model.generate_ids(model.tokenize(prompt), max_new_tokens=12, stop=False)
    assert len(ids) == 12
    a = model.generate(prompt, max_new_tokens=12, temperature=0.9, top_k=20, seed=3, stop=False)
    b = model.generate(prompt, max_new_tokens=12, temperature=0.9, top_k=20, seed=3, stop=False)
    assert a == b


def test_int4_everywhere_is_smaller_and_still_gated(gpt2_dir, held_txt, tmp_path):
    """--option output_bits=4 embeddings=int4: every weight at 4 bits (the token table as GatherBlockQuantized,
    the small position table float): a sixth of fp32's file, and the gate still holds it to int4's limits."""
    out = tmp_path / "b"
    result = quiet_build(_cfg(gpt2_dir, "int4-weight", out, held_txt,
                              target_options={"output_bits": 4, "embeddings": "int4"}))
    q = result.manifest["quantization"]
    assert q["matmuls_by_bits"] == {"4": 17} and q["quantized_embeddings"] == 1
    assert (out / "model.onnx").stat().st_size < 0.2 * 10.7e6
    default = result.manifest["validation"]["generation"]
    assert result.report.passed and default["kl_divergence"] > 1e-4


def test_the_kv_cache_gives_what_a_full_prefill_gives(gpt2_dir, tmp_path):
    """Decoding token by token through the cache must give the logits one prefill over the whole text gives."""
    import onnxruntime as ort

    from edgeexport.generation import KVDecoder
    from edgeexport.source_hf import export_with_past

    src = tmp_path / "m.onnx"
    export_with_past(gpt2_dir, src)
    dec = KVDecoder(ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]), context=256)
    ids = np.arange(100, 140)
    full, _ = dec.step(ids[None], dec.empty())
    logits, past = dec.step(ids[None, :10], dec.empty())
    steps = [logits[0]]
    for t in ids[10:]:
        logits, past = dec.step(np.array([[t]]), past)
        steps.append(logits[0])
    np.testing.assert_allclose(np.concatenate(steps), full[0], atol=2e-4)
    assert past[0].shape[2] == 40


@pytest.mark.parametrize("precision", ["fp32", "int4-weight"])
def test_a_llama_style_decoder_builds_too(precision, llama_dir, held_txt, tmp_path):
    """MatMul layers (nothing to split), grouped-query attention (2 KV heads for 4), rotary positions. Its random
    weights give a nearly flat next-token distribution: no position is decisive, and KL and perplexity decide."""
    result = quiet_build(_cfg(llama_dir, precision, tmp_path / "b", held_txt))
    gen = result.manifest["validation"]["generation"]
    assert result.report.passed and gen["next_token_top1"] is None and gen["decisive_positions"] < 50
    assert {c.metric for c in result.report.checks} == {"kl_divergence", "perplexity_change"}
    if precision == "int4-weight":
        q = result.manifest["quantization"]
        assert q["quantized_matmuls"] == 15 and q["gemms_split"] == 0 and q["float_weight_matmuls"] == 0
        assert q["matmuls_by_bits"] == {"4": 14, "8": 1} and q["output_layers"] == ["/lm_head/MatMul"]
    st = subprocess.run([sys.executable, str(tmp_path / "b" / "loader.py"), "--selftest"], capture_output=True,
                        text=True)
    assert st.returncode == 0, st.stdout + st.stderr


def test_the_gate_refuses_a_decoder_out_of_tolerance(gpt2_dir, held_txt, tmp_path):
    out = tmp_path / "b"
    with pytest.raises(ValidationFailed, match="out of tolerance") as e:
        quiet_build(_cfg(gpt2_dir, "int4-weight", out, held_txt, tolerance={"kl_divergence": 1e-5}))
    assert not e.value.report.passed and [c.metric for c in e.value.report.failures()] == ["kl_divergence"]
    assert not out.exists()


def test_bad_decoder_inputs_are_refused_with_the_fix(gpt2_dir, llama_dir, held_txt, tmp_path):
    from edgeexport.models.sentences import minilm_path

    out = tmp_path / "b"
    with pytest.raises(ConfigError, match="tokenizer has 2,048 tokens but the model's vocabulary has 1,024"):
        quiet_build(_cfg(save_llama(tmp_path / "small", gpt2_dir, vocab=1024), "fp32", out, held_txt))
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        quiet_build(_cfg(minilm_path(), "fp32", out, held_txt))
    # a causal LM without a KV-cache export path (GPT-1 keeps no cache; optimum has no config for it)
    import torch
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    torch.manual_seed(0)
    gpt1 = tmp_path / "gpt1"
    OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=2048, n_positions=128, n_embd=32, n_layer=1, n_head=2)
                         ).save_pretrained(gpt1)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(gpt2_dir) / name, gpt1 / name)
    with pytest.raises(EdgeExportError, match="cannot export this model as a decoder with a KV cache") as e:
        quiet_build(_cfg(gpt1, "fp32", out, held_txt))
    assert "openai-gpt" in e.value.why and "text-generation-with-past" in e.value.fix
    with pytest.raises(TargetError, match="not supported for --target tflite"):
        quiet_build(_cfg(llama_dir, "fp32", out, held_txt, target="tflite"))
    with pytest.raises(ConfigError, match=r"not offered for decoders \(int8 is the build's default precision\)"):
        quiet_build(_cfg(llama_dir, "int8", out, held_txt))
    with pytest.raises(ConfigError, match="block_size must be one of"):
        quiet_build(_cfg(llama_dir, "int4-weight", out, held_txt, target_options={"block_size": 48}))
    with pytest.raises(ConfigError, match="apply to --precision int4-weight only"):
        quiet_build(_cfg(llama_dir, "int8-weight", out, held_txt, target_options={"embeddings": "int4"}))
    with pytest.raises(ConfigError, match="needs a Hugging Face causal LM folder"):
        quiet_build(_cfg("x", "fp32", out, held_txt).model_copy(update={"model": "edgeexport.models.digits:model"}))
    with pytest.raises(CalibrationError, match="needs held-out text"):
        quiet_build(make_cfg(model=f"hf:{llama_dir}", task="text-generation", out=str(out)))
    short = tmp_path / "short.txt"
    short.write_text("Too little text to validate anything with here, really.\n")
    with pytest.raises(CalibrationError, match="validation needs at least"):
        quiet_build(_cfg(llama_dir, "fp32", out, short))
    with pytest.raises(ConfigError, match="applies to --task text-generation only"):
        quiet_build(make_cfg(model="edgeexport.models.digits:model", out=str(out),
                             tolerance={"perplexity_change": 0.1}))
    from edgeexport import pipeline

    with pytest.raises(ConfigError, match="built by `edgeexport build` and `edgeexport compare` only"):
        pipeline.resolve(_cfg(llama_dir, "fp32", out, held_txt), log=lambda _m: None)
    assert not out.exists()


def test_the_loader_refuses_bad_generation_requests(gpt2_dir, held_txt, tmp_path):
    from edgeexport.bundle.loader import InputError, load

    out = tmp_path / "b"
    quiet_build(_cfg(gpt2_dir, "fp32", out, held_txt))
    model = load(out)
    with pytest.raises(InputError, match="context is 256"):
        model.generate("word " * 300)
    with pytest.raises(InputError, match="must be a string"):
        model.generate(42)
    with pytest.raises(InputError, match="max_new_tokens must be an integer"):
        model.generate("The", max_new_tokens=2.5)
    with pytest.raises(InputError, match="prompt is empty"):
        model.generate("")
    # a prompt near the context stops at the context instead of failing mid-way
    ids = model.generate_ids(list(range(5, 250)), max_new_tokens=50, stop=False)
    assert len(ids) == 11


def test_a_decoder_bundle_packs_and_generates_from_its_archive(llama_dir, held_txt, tmp_path):
    from edgeexport.bundle.loader import load

    out = tmp_path / "b"
    quiet_build(_cfg(llama_dir, "fp32", out, held_txt, archive="tar.gz"))
    packed = tmp_path / "b.tar.gz"
    assert packed.is_file()
    assert load(packed).generate("The import", max_new_tokens=5, stop=False) == \
        load(out).generate("The import", max_new_tokens=5, stop=False)


def test_bench_times_a_decoder_per_token(cli, llama_dir, held_txt, tmp_path):
    out = tmp_path / "b"
    quiet_build(_cfg(llama_dir, "int4-weight", out, held_txt))
    r = cli("bench", out, "--runs", "10", "--warmup", "1", "--cold-runs", "0", "--json")
    assert r.exit_code == 0, r.stderr
    g = json.loads(r.stdout)["generation"]
    assert g["decode_steps"] == 32 and g["decode_tokens_per_s"] > 0 and g["ttft_ms"] > 0
    assert g["prompt_tokens"] == len(json.loads((out / "manifest.json").read_text())["generation"]["golden"][0]
                                     ["prompt_ids"])
    text = cli("bench", out, "--runs", "10", "--cold-runs", "0")
    assert "generation:  time to first token" in text.stdout and "tokens/s" in text.stdout


def test_compare_builds_validates_and_times_every_decoder_precision(cli, gpt2_dir, held_txt, tmp_path):
    from edgeexport.bundle.loader import load

    out, report = tmp_path / "bundles", tmp_path / "report.html"
    r = cli("compare", "--task", "text-generation", "--model", f"hf:{gpt2_dir}", "--calib", held_txt,
            "--targets", "ort,tflite", "--precisions", "fp32,int8-weight,int4-weight", "--runs", "10", "--rounds", "2",
            "--warmup", "1", "--threads", "1", "--out", out, "--report", report, "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["kind"] == "decoder" and res["accuracy_metric"] == "next_token_top1"
    rows = {f"{x['target']}/{x['precision']}": x for x in res["rows"]}
    assert list(rows) == ["ort/fp32", "ort/int8-weight", "ort/int4-weight", "tflite/fp32", "tflite/int8-weight",
                          "tflite/int4-weight"]
    assert "exporting" in r.stderr and r.stderr.count("once with optimum") == 1
    ref = res["reference"]
    assert ref["kind"] == "PyTorch eager fp32" and ref["generation"]["decode_tokens_per_s"] > 0
    for key, row in rows.items():
        if key.startswith("tflite/"):  # no growing KV cache on TFLite: skipped with the reason, never built
            assert row["status"] == "skipped" and "no growing KV cache" in row["reason"] and row["bundle"] is None
            continue
        assert row["status"] == "passed", (key, row["reason"])
        m, g = row["metrics"], row["generation"]
        assert m["decisive_positions"] > 1000 and m["next_token_top1"] >= 0.95 and abs(m["perplexity_change"]) < 0.05
        assert len(m["greedy_matching"]) == 3
        # latency is per decoded token: the speed-up is the decode tokens/s ratio, and the bundle is the one kept
        assert g["decode_tokens_per_s"] == pytest.approx(1e3 / row["latency"]["p50_ms"])
        assert row["speedup_vs_reference"] == pytest.approx(g["decode_tokens_per_s"] / ref["generation"]["decode_tokens_per_s"])
        assert g["ttft_ms"] > 0 and row["latency"]["runs"] == 2 * 5
        assert load(row["bundle"]).generate_ids([5, 6, 7], max_new_tokens=3, stop=False)
        assert row["size_bytes"] == (Path(row["bundle"]) / "model.onnx").stat().st_size
    assert rows["ort/int4-weight"]["size_bytes"] < 0.4 * rows["ort/fp32"]["size_bytes"]
    assert res["recommended"] in ("ort/fp32", "ort/int8-weight", "ort/int4-weight")
    page = report.read_text()
    assert "decode tok/s" in page and "top-1 (decisive)" in page and "held-out windows" in page
    text = cli("compare", "--task", "text-generation", "--model", f"hf:{gpt2_dir}", "--calib", held_txt,
               "--targets", "ort", "--precisions", "int4-weight", "--tolerance", "kl_divergence=0.00001",
               "--time-failed", "--runs", "5", "--rounds", "1", "--warmup", "0", "--threads", "1")
    # a refused precision is a FAILED row (timed with --time-failed, not kept), and nothing is recommended
    assert text.exit_code == 1 and "FAILED" in text.stdout and "timed anyway" in text.stdout
    assert "kl_divergence" in text.stdout and "No combination passed validation" in text.stdout


def test_compare_refuses_what_no_decoder_target_builds(cli, gpt2_dir, held_txt, tmp_path):
    base = ("compare", "--task", "text-generation", "--model", f"hf:{gpt2_dir}", "--calib", held_txt)
    r = cli(*base, "--precisions", "int8")
    assert r.exit_code == 2 and "which no target builds for decoders" in r.stderr and "int4-weight" in r.stderr
    r = cli(*base, "--targets", "tflite,trt")
    assert r.exit_code == 2 and "none of --targets tflite,trt builds decoders" in r.stderr and "--targets ort" in r.stderr
    # an option for another precision skips that row with the reason (compare's rule), never a crash
    r = cli(*base, "--targets", "ort", "--precisions", "fp32", "--option", "block_size=16", "--runs", "5",
            "--rounds", "1", "--warmup", "0")
    assert r.exit_code == 1 and "SKIPPED" in r.stdout and "block_size apply to --precision int4-weight" in r.stdout
    r = cli("compare", "--task", "text-generation", "--model", "edgeexport.models.digits:model", "--calib", held_txt)
    assert r.exit_code != 0 and "needs a Hugging Face causal LM folder" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_non_decoder_bundle_cannot_generate(digits_npz, tmp_path):
    from edgeexport.bundle.loader import InputError, load

    quiet_build(make_cfg(model="edgeexport.models.digits:model", out=str(tmp_path / "b"),
                         calibration={"path": str(digits_npz)}, bench={"enabled": False}))
    with pytest.raises(InputError, match="not a text-generation decoder"):
        load(tmp_path / "b").generate("hello")


CONV_NET = '''
import torch


def model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 4))
    return net.eval(), (torch.randn(1, 3, 16, 16),)
'''


def test_weight_only_refuses_a_network_whose_weights_are_mostly_convolutions(tmp_path):
    """A CNN's only MatMul is its classifier: int4-weight would leave nearly every weight float."""
    src = tmp_path / "conv_net.py"
    src.write_text(CONV_NET)
    rng = np.random.default_rng(0)
    data = tmp_path / "x.npz"
    np.savez(data, input=rng.normal(size=(60, 1, 3, 16, 16)).astype(np.float32))
    with pytest.raises(TargetError, match="would leave most of this model float") as e:
        quiet_build(make_cfg(model=f"{src}:model", precision="int4-weight", out=str(tmp_path / "b"),
                             calibration={"path": str(data)}, bench={"enabled": False}))
    assert "they hold 1% of this model's weights" in e.value.why
    assert not (tmp_path / "b").exists()


def test_a_refused_weight_only_build_is_advised_on_weights_not_calibration(rows_npz, tmp_path):
    """Weight-only precisions use no calibration: the refusal points at the block size and the weight width."""
    with pytest.raises(ValidationFailed) as e:
        quiet_build(make_cfg(model="edgeexport.models.digit_rows:model", precision="int4-weight",
                             out=str(tmp_path / "b"), calibration={"path": str(rows_npz)}, bench={"enabled": False},
                             tolerance={"snr_db": 200.0}))
    assert "--option block_size=16" in e.value.fix and "--precision int8-weight" in e.value.fix
    assert "calib" not in e.value.fix and not (tmp_path / "b").exists()
