"""Latency statistics, batched feeds and FLOP counting: the measuring tools behind bench and compare."""

import numpy as np
import pytest

from edgeexport.bench import batched_feed, sample_latency, summarize
from edgeexport.errors import UsageError


def test_summarize_percentiles_and_aliases():
    s = summarize([float(v) for v in range(1, 101)])  # 1..100 ms
    assert s["runs"] == 100 and s["min_ms"] == 1 and s["max_ms"] == 100
    assert s["p50_ms"] == s["median_ms"] == pytest.approx(50.5)
    assert s["p90_ms"] == pytest.approx(90.1) and s["p99_ms"] == pytest.approx(99.01)
    assert s["mean_ms"] == pytest.approx(50.5)


def test_sample_latency_counts_runs_or_fills_a_time_budget():
    calls = []
    assert len(sample_latency(lambda: calls.append(1), warmup=3, runs=7)) == 7 and len(calls) == 10
    samples = sample_latency(lambda: sum(range(1000)), warmup=0, runs=None, duration_s=0.05)
    assert len(samples) > 5 and all(t >= 0 for t in samples)


def test_batched_feed_repeats_golden_rows_and_refuses_a_fixed_batch():
    x = np.arange(6, dtype=np.float32).reshape(1, 6)
    feed = batched_feed([{"name": "x", "shape": ["batch", 6]}], {"x": x}, 4)
    assert feed["x"].shape == (4, 6) and (feed["x"] == x).all()
    assert batched_feed([{"name": "x", "shape": [1, 6]}], {"x": x}, 1)["x"] is x
    assert batched_feed([{"name": "x", "shape": [8, 6]}], {"x": x}, 8)["x"].shape == (8, 6)  # fixed, and it fits
    with pytest.raises(UsageError, match="fixed batch dimension"):
        batched_feed([{"name": "x", "shape": [1, 6]}], {"x": x}, 8)


def test_count_flops_on_a_hand_made_graph(tmp_path):
    """Conv 3->8 k3 on 1x3x10x10 (pad 1), Gemm 800->16 (transB), MatMul [1,16]x[16,4]: known counts."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgeexport.flops import count_flops

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    g = numpy_helper.from_array(rng.standard_normal((16, 800)).astype(np.float32), "g")
    m = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "m")
    shape = numpy_helper.from_array(np.array([1, 800], dtype=np.int64), "shape")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("Gemm", ["r", "g"], ["h"], transB=1),
             helper.make_node("MatMul", ["h", "m"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, g, m, shape])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    stats = count_flops(path, {"x": np.zeros((1, 3, 10, 10), np.float32)})
    conv, gemm, matmul = 2 * 8 * 10 * 10 * 3 * 9, 2 * 16 * 800, 2 * 4 * 16
    assert stats["by_op"] == {"Conv": conv, "Gemm": gemm, "MatMul": matmul}
    assert stats["flops"] == conv + gemm + matmul
    assert stats["params"] == 8 * 27 + 16 * 800 + 64  # float initializers only (the int64 shape is not a weight)


def test_matmul_peak_is_measured():
    from edgeexport.flops import matmul_peak

    peak = matmul_peak(threads=1, n=256, seconds=0.1)
    assert peak["gflops_per_s"] > 0.1 and peak["best"] in peak["by_library"]
