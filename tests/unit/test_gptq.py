"""GPTQ weight rounding: better than nearest rounding on correlated inputs, on the quantizer's own grid, and the
im2col patches it learns from are the ones each Conv really multiplies."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeexport import gptq, recipes


def _correlated(rng, n, mixing):
    """Inputs whose features move together (a few factors plus noise), as a layer's real inputs do."""
    return rng.normal(size=(n, mixing.shape[0])) @ mixing + 0.1 * rng.normal(size=(n, mixing.shape[1]))


@pytest.mark.parametrize("qmax", [127, 64, 7])
def test_gptq_beats_nearest_rounding_on_correlated_inputs_and_stays_on_the_grid(qmax):
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(4, 48))
    x = _correlated(rng, 2000, mixing)
    w = rng.normal(size=(16, 48))
    scale = np.abs(w).max(axis=1) / qmax
    h = x.T @ x
    q = gptq.round_rows(w, h, scale, qmax)
    nearest = np.clip(np.round(w / scale[:, None]), -qmax, qmax) * scale[:, None]
    held_out = _correlated(rng, 2000, mixing)
    err_gptq = np.mean((held_out @ (w - q).T) ** 2)
    err_nearest = np.mean((held_out @ (w - nearest).T) ** 2)
    assert err_gptq < 0.5 * err_nearest, (err_gptq, err_nearest)
    ints = q / scale[:, None]
    assert np.allclose(ints, np.round(ints), atol=1e-6) and np.abs(np.round(ints)).max() <= qmax
    # each row keeps its largest weight, so a quantizer deriving scale = max |w| / qmax finds the same grid
    assert np.allclose(np.abs(q).max(axis=1) / qmax, scale)


def test_uncorrelated_inputs_give_nearest_rounding():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 32))
    scale = np.abs(w).max(axis=1) / 127
    q = gptq.round_rows(w, np.eye(32) * 5.0, scale, 127)
    assert np.allclose(q, np.clip(np.round(w / scale[:, None]), -127, 127) * scale[:, None])


def _conv_model(w, **attrs):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    graph = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(w.astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), node


@pytest.mark.parametrize("shape,attrs,x_shape", [
    ((6, 4, 3, 3), dict(pads=[1, 1, 1, 1], strides=[2, 2]), (1, 4, 9, 11)),
    ((6, 2, 3, 2), dict(group=2, pads=[0, 1, 2, 0], dilations=[2, 1]), (1, 4, 10, 7)),
    ((8, 1, 5, 5), dict(group=8, pads=[2, 2, 2, 2]), (1, 8, 7, 7)),  # depthwise
    ((5, 3, 1, 1), {}, (2, 3, 4, 4)),  # pointwise, batch of 2
    ((4, 3, 3), dict(pads=[1, 0], strides=[2]), (1, 3, 12)),  # 1-D
])
def test_patches_are_what_the_conv_multiplies(shape, attrs, x_shape):
    rng = np.random.default_rng(2)
    w = rng.normal(size=shape)
    model, node = _conv_model(w, **attrs)
    x = rng.normal(size=x_shape).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    g = attrs.get("group", 1)
    rows = w.reshape(shape[0], -1)
    for b in range(x_shape[0]):
        p = gptq._patches(x[b], node, tuple(shape[2:]))
        per = shape[0] // g
        mine = np.concatenate([rows[k * per:(k + 1) * per] @ p[k] for k in range(g)])
        assert np.allclose(mine, y[b].reshape(shape[0], -1), atol=1e-4)


def _small_cnn(path):
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(size=(8, 1, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(size=(5, 8)).astype(np.float32), "w3"),
             numpy_helper.from_array(rng.normal(size=5).astype(np.float32), "b3")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="c2", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="p"),
             helper.make_node("Flatten", ["p"], ["f"], name="f"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return [{"x": (rng.normal(size=(1, 3, 8, 8)) + np.linspace(0, 2, 8)).astype(np.float32)} for _ in range(16)]


@pytest.mark.parametrize("per_channel,reduce_range", [(True, False), (False, False), (True, True)])
def test_onnxruntime_quantizes_gptq_weights_to_the_same_integers(tmp_path, per_channel, reduce_range):
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    src = tmp_path / "m.onnx"
    feeds = _small_cnn(src)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    def quantize(path, dst):
        quantize_static(str(path), str(dst), Reader(), per_channel=per_channel, reduce_range=reduce_range,
                        weight_type=QuantType.QInt8, extra_options={"WeightSymmetric": True})
        return onnx.load(str(dst))

    first = quantize(src, tmp_path / "q1.onnx")
    grids = gptq.qdq_grids(first)
    assert set(grids) == {"c1", "c2", "fc"}
    assert {g.qmax for g in grids.values()} == ({64} if reduce_range else {127})
    rounded, info = gptq.round_weights(src, grids, feeds)
    assert info["weight_rounding"] == "gptq" and info["gptq_layers"] == 3
    nearest = recipes.dequantized_weights(first)
    assert any(not np.allclose(rounded[k], nearest[k]) for k in rounded)  # it did change some roundings
    gptq.write_weights(src, tmp_path / "g.onnx", rounded)
    again = recipes.dequantized_weights(quantize(tmp_path / "g.onnx", tmp_path / "q2.onnx"))
    for name, w in rounded.items():
        assert np.allclose(again[name], w, rtol=0, atol=1e-6 * np.abs(w).max()), name


def test_max_abs_grids_are_tflites_rounding():
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="c")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.random.default_rng(4).normal(size=(4, 2, 3, 3)).astype(np.float32), "w")]))
    grid = gptq.max_abs_grids(model)["c"]
    nearest = recipes.rounded_weights(model)["c"]
    assert grid.qmax == 127
    assert np.allclose(np.abs(nearest).reshape(4, -1).max(axis=1) / 127, grid.scale)


def test_wide_layers_keep_nearest_rounding_and_layers_are_gathered_in_passes_that_fit(tmp_path, monkeypatch):
    src = tmp_path / "m.onnx"
    feeds = _small_cnn(src)
    model = onnx.load(str(src))
    grids = gptq.max_abs_grids(model)
    monkeypatch.setattr(gptq, "MAX_COLUMNS", 20)  # c1 has 3 x 3 x 3 = 27 inputs per output channel
    rounded, info = gptq.round_weights(src, grids, feeds)
    assert set(rounded) == {"c2", "fc"} and info["gptq_skipped_wide_layers"] == 1
    monkeypatch.setattr(gptq, "MAX_COLUMNS", 8192)
    monkeypatch.setattr(gptq, "PASS_BYTES", 1)  # one layer per pass: the same result, three passes over the data
    calls = []
    real = gptq.hessians
    monkeypatch.setattr(gptq, "hessians", lambda *a: calls.append(len(a[1])) or real(*a))
    gptq._CACHE.clear()
    again, _ = gptq.round_weights(src, grids, feeds)
    assert calls == [1, 1, 1]  # c1 was measured before, but with other layers: the cache holds c2 and fc only
    gptq._CACHE.clear()
    monkeypatch.setattr(gptq, "PASS_BYTES", 1 << 30)
    once, _ = gptq.round_weights(src, grids, feeds)
    assert calls == [1, 1, 1, 3] and all(np.allclose(again[k], once[k]) for k in once)


def test_trial_builds_of_the_same_graph_and_samples_reuse_the_measured_inputs(tmp_path, monkeypatch):
    src = tmp_path / "m.onnx"
    feeds = _small_cnn(src)
    grids = gptq.max_abs_grids(onnx.load(str(src)))
    calls = []
    real = gptq.hessians
    monkeypatch.setattr(gptq, "hessians", lambda *a: calls.append([n.name for n in a[1]]) or real(*a))
    gptq._CACHE.clear()
    first, _ = gptq.round_weights(src, grids, feeds)
    fewer, _ = gptq.round_weights(src, {k: v for k, v in grids.items() if k != "c2"}, feeds)  # c2 kept float
    assert calls == [["c1", "c2", "fc"]] and all(np.allclose(fewer[k], first[k]) for k in fewer)
    gptq.round_weights(src, grids, feeds[:8])  # other samples: measured again
    assert calls[1:] == [["c1", "c2", "fc"]]


def test_inputs_that_cannot_be_measured_leave_nearest_rounding_and_say_why(tmp_path, monkeypatch):
    src = tmp_path / "m.onnx"
    feeds = _small_cnn(src)

    def broken(*args):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(gptq, "hessians", broken)
    rounded, info = gptq.round_weights(src, gptq.max_abs_grids(onnx.load(str(src))), feeds)
    assert rounded == {} and info["weight_rounding"].startswith("nearest (GPTQ could not measure")
