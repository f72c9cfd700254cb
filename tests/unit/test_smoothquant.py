"""SmoothQuant on small graphs built in code: exact in float, chosen only where it lowers the int8 error, and safe
with shared weights, transposed Gemm weights and residual readers of the smoothed tensor."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgeexport import smoothquant

RNG = np.random.default_rng(0)
K, N = 32, 16


def _graph(path, outlier=40.0, share_weight=False):
    """x [4, K] -> MatMul(W1), Gemm(W2^T, transB=1) and a residual Add of x itself; channel 0..2 of x (the
    LayerNorm-gain outliers of real encoders) ``outlier`` times larger, compensated in the weights' rows."""
    gain = np.ones(K, np.float32)
    gain[:3] = outlier
    w1 = RNG.standard_normal((K, N)).astype(np.float32) / gain[:, None]
    w2 = w1.T.copy() if share_weight else (RNG.standard_normal((N, K)).astype(np.float32) / gain[None, :])
    inits = [numpy_helper.from_array(gain, "gain"), numpy_helper.from_array(w1, "w1"),
             numpy_helper.from_array(np.zeros(N, np.float32), "b2"), numpy_helper.from_array(w2, "w2")]
    nodes = [helper.make_node("Mul", ["x", "gain"], ["h"], name="ln_gain"),
             helper.make_node("MatMul", ["h", "w1"], ["y1"], name="mm"),
             helper.make_node("Gemm", ["h", "w2", "b2"], ["y2"], name="gemm", transB=1),
             helper.make_node("Add", ["y1", "y2"], ["y"], name="sum"),
             helper.make_node("ReduceSum", ["h"], ["r"], name="residual", keepdims=0)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, N]),
                           helper.make_tensor_value_info("r", TensorProto.FLOAT, [])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _feeds(n=16):
    return [{"x": RNG.standard_normal((4, K)).astype(np.float32)} for _ in range(n)]


def _run(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


def test_smoothing_is_exact_in_float_and_keeps_the_residual_reader_unscaled(tmp_path):
    src = _graph(tmp_path / "g.onnx")
    feeds = _feeds()
    rec = smoothquant.smooth(src, tmp_path / "s.onnx", feeds)["smoothquant"]
    assert rec["smoothed_matmuls"] == 2 and rec["activation_tensors"] == 1  # MatMul and transposed Gemm, one Mul
    model = onnx.load(str(tmp_path / "s.onnx"))
    onnx.checker.check_model(model)
    muls = [n for n in model.graph.node if n.name == "h_smooth"]
    assert len(muls) == 1
    residual = next(n for n in model.graph.node if n.name == "residual")
    assert residual.input[0] == "h"  # the other reader keeps the unscaled tensor
    for feed in feeds[:4]:
        for a, b in zip(_run(src, feed), _run(tmp_path / "s.onnx", feed)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_smoothing_lowers_the_simulated_int8_error_of_outlier_channels():
    gain = np.ones(K, np.float32)
    gain[:3] = 40.0
    rows = RNG.standard_normal((512, K)).astype(np.float32) * gain
    bounds = np.stack([rows.min(0), rows.max(0)])
    w = RNG.standard_normal((K, N)).astype(np.float32) / gain[:, None]
    alpha, s, tried = smoothquant.choose(rows, bounds, [w])
    assert alpha is not None and tried["none"] > 5 * tried[alpha]
    assert s[:3].min() > 5 * np.median(s[3:])  # the outlier channels are the ones divided down


def test_tensors_without_outliers_are_left_alone():
    for _ in range(5):
        rows = RNG.uniform(-1, 1, (512, K)).astype(np.float32)  # every channel spans the same range
        bounds = np.stack([np.full(K, -1.0), np.full(K, 1.0)])
        w = RNG.standard_normal((K, N)).astype(np.float32)
        alpha, s, tried = smoothquant.choose(rows, bounds, [w])
        assert alpha is None and np.all(s == 1.0), tried


def test_a_weight_shared_by_two_nodes_is_not_rescaled(tmp_path):
    src = _graph(tmp_path / "g.onnx", share_weight=True)
    model = onnx.load(str(src))  # the Gemm reads the MatMul's weight through a Transpose: make it literally shared
    gemm = next(n for n in model.graph.node if n.name == "gemm")
    gemm.input[1] = "w1"
    gemm.ClearField("attribute")
    onnx.save(model, str(src))
    rec = smoothquant.smooth(src, tmp_path / "s.onnx", _feeds())["smoothquant"]
    assert rec["smoothed_matmuls"] == 0


def test_factors_keep_dead_channels_and_zero_weight_rows_at_one():
    s = smoothquant.factors(np.array([0.0, 4.0, 4.0]), np.array([1.0, 0.0, 1.0]), 0.5)
    assert s[0] == 1.0 and s[1] == 1.0 and s[2] == 2.0
