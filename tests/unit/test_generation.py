"""Decoder pieces that need no trained model: the Gemm split before weight-only quantization, the generation
metrics, sampling, the KV-cache layout checks, and the decoder's text split."""

from types import SimpleNamespace

import numpy as np
import pytest

from edgeexport.bundle.loader import BundleError, InputError, decoder_layout, pick
from edgeexport.generation import DECISIVE_GAP, MIN_DECISIVE, generation_metrics, position_stats, windows


def _gemm_graph(trans_b: int, beta: float, bias: bool, shared: bool = False):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 5) if trans_b else (5, 6)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    ins = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=6).astype(np.float32), "B"))
        ins.append("B")
    nodes = [helper.make_node("Gemm", ins, ["y"], name="g", transB=trans_b, beta=beta)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])]
    if shared:  # the same weight read by a second Gemm: the transposed copy must not replace it
        nodes.append(helper.make_node("Gemm", ["x", "W"], ["z"], name="g2", transB=trans_b))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 6]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])], outputs,
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model, x):
    import onnxruntime as ort

    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})


@pytest.mark.parametrize("trans_b,beta,bias,shared", [(1, 1.0, True, False), (0, 1.0, True, False),
                                                      (1, 0.5, True, False), (0, 1.0, False, False),
                                                      (1, 1.0, False, True)])
def test_gemm_split_into_matmul_is_exact(trans_b, beta, bias, shared):
    import copy

    from edgeexport.weightonly import gemm_to_matmul

    model = _gemm_graph(trans_b, beta, bias, shared)
    x = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    before = _run(model, x)
    split = copy.deepcopy(model)
    assert gemm_to_matmul(split) == (2 if shared else 1)
    assert {n.op_type for n in split.graph.node} <= {"MatMul", "Add"}
    for a, b in zip(before, _run(split, x)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_weight_only_quantizes_the_split_layers_and_refuses_bad_settings(tmp_path):
    import onnx

    from edgeexport.weightonly import quantize_weight_only

    src = tmp_path / "g.onnx"
    onnx.save(_gemm_graph(1, 1.0, True), str(src))
    rec = quantize_weight_only(src, tmp_path / "q.onnx", 8, block_size=16)
    assert rec["quantized_matmuls"] == 1 and rec["gemms_split"] == 1 and rec["float_weight_matmuls"] == 0
    x = np.random.default_rng(2).normal(size=(3, 5)).astype(np.float32)
    ref = _run(onnx.load(str(src)), x)[0]
    got = _run(onnx.load(str(tmp_path / "q.onnx")), x)[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    # at 4 bits the layer producing the graph output stays at 8 unless asked
    rec4 = quantize_weight_only(src, tmp_path / "q4.onnx", 4, block_size=16)
    assert rec4["output_layers"] == ["g_MatMul"] and rec4["matmuls_by_bits"] == {"8": 1}
    rec4 = quantize_weight_only(src, tmp_path / "q4.onnx", 4, block_size=16, output_bits=4)
    assert rec4["matmuls_by_bits"] == {"4": 1}
    with pytest.raises(ValueError, match="4 or 8 bits"):
        quantize_weight_only(src, tmp_path / "x.onnx", 3)
    with pytest.raises(ValueError, match="block_size"):
        quantize_weight_only(src, tmp_path / "x.onnx", 4, block_size=48)


def test_metrics_leave_near_ties_out_of_the_top1_check():
    rng = np.random.default_rng(0)
    n, v = 200, 50
    ref = rng.normal(size=(n + 1, v)) * 0.01  # nearly flat: every position is a near-tie
    ref[:100, 0] += 5.0                       # the first 100 positions are decisive (token 0)
    built = ref.copy()
    built[100:150] = built[100:150][:, ::-1]  # flip choices only where the reference was undecided
    ids = rng.integers(0, v, n + 1)
    stats = position_stats(ref, built, ids)
    assert stats["gap"][:100].min() >= DECISIVE_GAP and stats["gap"][100:].max() < DECISIVE_GAP
    m = generation_metrics([stats])
    assert m["decisive_positions"] == 100 >= MIN_DECISIVE
    assert m["next_token_top1"] == 1.0 and m["next_token_top1_all"] < 0.9
    same = generation_metrics([position_stats(ref, ref, ids)])
    assert abs(same["kl_divergence"]) < 1e-12 and same["perplexity_change"] == 0.0
    # a built model that changes a decisive choice is caught, and its KL and perplexity move
    worse = ref.copy()
    worse[:100, 0] -= 10.0
    bad = generation_metrics([position_stats(ref, worse, ids)])
    assert bad["next_token_top1"] == 0.0 and bad["kl_divergence"] > 1.0


def test_metrics_skip_the_top1_check_where_nothing_is_decisive():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(30, 40)) * 1e-3
    m = generation_metrics([position_stats(ref, ref[:, ::-1], rng.integers(0, 40, 30))])
    assert m["next_token_top1"] is None and m["decisive_positions"] < MIN_DECISIVE


def test_pick_is_greedy_at_zero_temperature_and_samples_within_top_k():
    logits = np.array([0.0, 3.0, 2.9, -1.0, 2.8])
    rng = np.random.default_rng(0)
    assert pick(logits, 0.0, 0, rng) == 1
    draws = {pick(logits, 1.0, 2, rng) for _ in range(200)}
    assert draws == {1, 2}
    a = [pick(logits, 1.0, 0, np.random.default_rng(7)) for _ in range(5)]
    b = [pick(logits, 1.0, 0, np.random.default_rng(7)) for _ in range(5)]
    assert a == b


def _io(name, shape, type_="tensor(float)"):
    return SimpleNamespace(name=name, shape=shape, type=type_)


def test_layout_reads_the_cache_and_refuses_other_graphs():
    ins = [_io("input_ids", ["b", "s"], "tensor(int64)"), _io("attention_mask", ["b", "t"], "tensor(int64)")]
    ins += [_io(f"past_key_values.{i}.{kv}", ["b", 2, "p", 8]) for i in (1, 0) for kv in ("value", "key")]
    outs = [_io("logits", ["b", "s", 10])] + [_io(f"present.{i}.{kv}", ["b", 2, "t", 8]) for i in (0, 1)
                                               for kv in ("key", "value")]
    lay = decoder_layout(ins, outs)
    assert lay.past == ["past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key",
                        "past_key_values.1.value"]
    assert lay.present[0] == "present.0.key" and lay.heads == [2] * 4 and not lay.position_ids
    with pytest.raises(BundleError, match="not a decoder with a KV cache"):
        decoder_layout(ins[:2], outs[:1])
    with pytest.raises(BundleError, match="present outputs"):
        decoder_layout(ins, outs[:1])
    dynamic_heads = ins[:2] + [_io("past_key_values.0.key", ["b", "h", "p", 8]),
                               _io("past_key_values.0.value", ["b", "h", "p", 8])]
    with pytest.raises(BundleError, match="fixed heads"):
        decoder_layout(dynamic_heads, outs)


def test_windows_and_decoder_text_split():
    assert windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a 1-token tail predicts nothing

    from edgeexport.models import decoder

    train, held = decoder.training_text(), decoder.held_out_text()
    assert len(held) > 150 and not set(held) & set(train)
    assert sum(map(len, held)) > 30_000  # enough held-out text for thousands of tokens
    prompts = decoder.prompts(4)
    assert len(prompts) == 4 and all(len(p.split()) == 6 for p in prompts)


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


def test_a_target_without_a_decoder_path_refuses_to_build_one(tmp_path):
    """Target.build_decoder's default is the target's own refusal, not a crash, for a caller that skips the check."""
    from edgeexport.errors import TargetError
    from edgeexport.targets import all_targets

    for target in all_targets():
        if target.decoder_precisions:
            continue
        with pytest.raises(TargetError, match=f"not supported for --target {target.name}") as e:
            target.build_decoder(None, tmp_path, tmp_path / "m.onnx")  # type: ignore[arg-type]
        assert e.value.why == target.decoder_refusal
