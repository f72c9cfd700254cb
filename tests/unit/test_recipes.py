"""The int8 recipe pieces on small graphs built in code: sentinel detection, graph families, bias correction,
integer share."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeexport import recipes

RNG = np.random.default_rng(0)


def _scores(pads: int, fill: float) -> np.ndarray:
    """[1, heads, 16, 16] attention scores plus an additive mask over the last ``pads`` key positions."""
    s = RNG.standard_normal((1, 4, 16, 16)).astype(np.float32) * 3
    s[..., 16 - pads:] += fill
    return s


@pytest.mark.parametrize("fill", [np.finfo(np.float32).min, -1e9, -1e4, -np.inf])
def test_additive_masks_are_unrepresentable_whatever_their_fill(fill):
    assert recipes.is_unrepresentable(_scores(5, fill))
    mask = np.zeros((1, 1, 1, 16), np.float32)
    mask[..., 10:] = fill
    assert recipes.is_unrepresentable(np.broadcast_to(mask, (1, 4, 16, 16)).copy())


def test_outlier_channels_and_ordinary_tensors_are_not_sentinels():
    x = np.abs(RNG.standard_normal((1, 64, 8, 8)).astype(np.float32))
    assert not recipes.is_unrepresentable(x)
    x[:, 3] *= 400  # an outlier channel varies: int16 or float fallback is for the ranking to decide
    assert not recipes.is_unrepresentable(x * 10)
    one = np.zeros((1, 1000), np.float32)
    one[0, 0] = 1e6  # a single huge value is not a mask
    assert not recipes.is_unrepresentable(one)
    assert not recipes.is_unrepresentable(np.full((4, 4), 5000.0, np.float32))  # no small values: nothing lost
    assert not recipes.is_unrepresentable(np.arange(10, dtype=np.int64))


def _graph(nodes, inputs, outputs, inits):
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_family_tells_attention_from_convolutions():
    w = RNG.standard_normal((8, 8)).astype(np.float32)
    attn = _graph([helper.make_node("MatMul", ["x", "w"], ["q"], name="proj"),
                   helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1], name="t"),
                   helper.make_node("MatMul", ["q", "xt"], ["s"], name="scores"),
                   helper.make_node("Add", ["s", "mask"], ["sm"], name="masked"),
                   helper.make_node("Softmax", ["sm"], ["p"], axis=-1, name="softmax"),
                   helper.make_node("MatMul", ["p", "x"], ["y"], name="ctx")],
                  [_vi("x", [1, 8, 8])], [_vi("y", [1, 8, 8])],
                  {"w": w, "mask": np.zeros((1, 8, 8), np.float32)})
    assert recipes.family(attn) == "transformer"
    assert recipes.weighted_nodes(attn) == ["proj"]  # the activation x activation MatMuls are not weighted
    conv = _graph([helper.make_node("Conv", ["x", "k", "b"], ["c"], name="conv"),
                   helper.make_node("Flatten", ["c"], ["f"], name="flat"),
                   helper.make_node("Gemm", ["f", "fc", "fb"], ["logits"], transB=1, name="fc"),
                   helper.make_node("Softmax", ["logits"], ["y"], name="softmax")],
                  [_vi("x", [1, 2, 4, 4])], [_vi("y", [1, 3])],
                  {"k": RNG.standard_normal((4, 2, 1, 1)).astype(np.float32), "b": np.zeros(4, np.float32),
                   "fc": RNG.standard_normal((3, 64)).astype(np.float32), "fb": np.zeros(3, np.float32)})
    assert recipes.family(conv) == "cnn"  # a classifier's softmax reads a Gemm, not attention
    assert recipes.weighted_nodes(conv) == ["conv", "fc"]


def _run(model, feed):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize("kind", ["conv", "depthwise", "gemm", "matmul_add"])
def test_bias_correction_cancels_the_mean_shift_of_weight_rounding(tmp_path, kind):
    """With the rounded weights in place, the corrected model's mean output equals the float model's (exactly,
    for 1x1 kernels without padding), while the uncorrected one is off."""
    cin, cout = 6, 6
    if kind in ("conv", "depthwise"):
        group = cin if kind == "depthwise" else 1
        w = RNG.standard_normal((cout, cin // group, 1, 1)).astype(np.float32)
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], group=group, name="layer")]
        shape, feed_shape = [1, cin, 5, 5], (1, cin, 5, 5)
        inits = {"w": w, "b": RNG.standard_normal(cout).astype(np.float32)}
    elif kind == "gemm":
        w = RNG.standard_normal((cout, cin)).astype(np.float32)
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="layer")]
        shape, feed_shape = [1, cin], (1, cin)
        inits = {"w": w, "b": RNG.standard_normal(cout).astype(np.float32)}
    else:
        w = RNG.standard_normal((cin, cout)).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="layer"),
                 helper.make_node("Add", ["h", "b"], ["y"], name="bias")]
        shape, feed_shape = [1, 7, cin], (1, 7, cin)
        inits = {"w": w, "b": RNG.standard_normal(cout).astype(np.float32)}
    model = _graph(nodes, [_vi("x", shape)], [_vi("y", None)], inits)
    src = tmp_path / "f.onnx"
    onnx.save(model, str(src))
    feeds = [{"x": (RNG.standard_normal(feed_shape) + 2.0).astype(np.float32)} for _ in range(32)]  # non-zero means
    rounded = w + RNG.uniform(-0.05, 0.05, w.shape)  # what a quantizer's rounding did to the weight
    done = recipes.bias_correct(src, tmp_path / "c.onnx", {"layer": rounded}, feeds)
    assert done["bias_corrected_layers"] == 1

    def with_rounded(path):
        m = onnx.load(str(path))
        for t in m.graph.initializer:
            if t.name == "w":
                t.CopyFrom(numpy_helper.from_array(rounded.astype(np.float32), "w"))
        return m

    def mean_out(m):
        outs = np.stack([_run(m, f) for f in feeds])
        return outs.mean(axis=tuple(a for a in range(outs.ndim) if a != (2 if kind in ("conv", "depthwise") else outs.ndim - 1)))

    ref = mean_out(model)
    assert np.abs(mean_out(with_rounded(src)) - ref).max() > 1e-2  # the rounding shifted the means ...
    np.testing.assert_allclose(mean_out(with_rounded(tmp_path / "c.onnx")), ref, atol=1e-4)  # ... corrected


def test_rounded_weights_are_symmetric_per_channel():
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    model = _graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], [_vi("x", [1, 3, 5, 5])],
                   [_vi("y", None)], {"w": w})
    q = recipes.rounded_weights(model)["c"]
    for o in range(4):
        step = np.abs(w[o]).max() / 127
        np.testing.assert_allclose(q[o] / step, np.round(q[o] / step), atol=1e-6)
        assert np.abs(q[o] - w[o]).max() <= step / 2 + 1e-9


def test_integer_share_counts_what_really_runs_in_int8(tmp_path):
    """A Q/DQ Gemm on int8 weights and activations counts; a float Gemm next to it does not."""
    from onnxruntime.quantization import QuantType, quantize_static

    w1 = RNG.standard_normal((16, 32)).astype(np.float32)
    w2 = RNG.standard_normal((4, 16)).astype(np.float32)
    model = _graph([helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1, name="big"),
                    helper.make_node("Gemm", ["h", "w2"], ["y"], transB=1, name="small")],
                   [_vi("x", [1, 32])], [_vi("y", [1, 4])], {"w1": w1, "w2": w2})
    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(model, str(src))

    class Reader:
        def __init__(self):
            self.it = iter([{"x": RNG.standard_normal((1, 32)).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(dst), Reader(), nodes_to_exclude=["small"], weight_type=QuantType.QInt8)
    share = recipes.integer_share(dst, src, {"x": np.ones((1, 32), np.float32)})
    assert share["weighted_layers"] == 2 and share["float_weighted_layers"] == 1
    assert share["integer_mac_share"] == pytest.approx(512 / (512 + 64), abs=1e-3)
    assert recipes.advise(share) is None  # most of the work is integer
    assert "stayed float" in recipes.advise({**share, "integer_mac_share": 0.1})


def test_integer_share_counts_embedding_tables_in_the_weight_bytes(tmp_path):
    """A float embedding table is most of a small encoder's bytes: an int8 MatMul next to it must not make the
    weight share read 100%. Quantizing the Gather too (dynamic int8 does) brings it in."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    table = RNG.standard_normal((1000, 16)).astype(np.float32)
    w = RNG.standard_normal((16, 16)).astype(np.float32)
    model = _graph([helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
                    helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")],
                   [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])], [_vi("y", [1, 8, 16])],
                   {"table": table, "w": w})
    src = tmp_path / "f.onnx"
    onnx.save(model, str(src))
    feed = {"ids": np.arange(8, dtype=np.int64)[None]}
    for op_types, tables_float in ((["MatMul"], ["embed"]), (["MatMul", "Gather"], [])):
        dst = tmp_path / f"q{len(op_types)}.onnx"
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=op_types)
        share = recipes.integer_share(dst, src, feed)
        assert share["integer_mac_share"] == 1.0 and share["embedding_tables"] == 1
        assert share["float_embedding_tables"] == tables_float
        if tables_float:
            assert share["integer_weight_share"] == pytest.approx(256 / (256 + 16000), abs=1e-3)
            assert "embedding table(s) embed stayed float" in recipes.advise(share)
        else:
            assert share["integer_weight_share"] == 1.0 and recipes.advise(share) is None


def _float_layer_after_dq(tmp_path, op: str):
    """input -> Q -> DQ -> Conv or Gemm with a *float* weight whose output channels span 1e-3..10 (a layer kept in
    float on purpose); returns (path, the feed, what the graph computes)."""
    scale, zero = np.float32(0.02), np.uint8(128)
    if op == "Conv":
        w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32) * np.array([1e-3, 1e-2, 1, 10], np.float32)[:, None, None, None]
        x_shape, y_shape = [1, 3, 8, 8], [1, 4, 6, 6]
        layer = helper.make_node("Conv", ["xd", "w", "b"], ["h"], name="kept_float")
    else:
        w = RNG.standard_normal((4, 16)).astype(np.float32) * np.array([1e-3, 1e-2, 1, 10], np.float32)[:, None]
        x_shape, y_shape = [2, 16], [2, 4]
        layer = helper.make_node("Gemm", ["xd", "w", "b"], ["h"], name="kept_float", transB=1)
    b = np.array([0.01, -0.02, 0.3, 1.0], np.float32)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
         helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]), layer,
         helper.make_node("QuantizeLinear", ["h", "s2", "z"], ["hq"]),  # the next layer's input is int8 again
         helper.make_node("DequantizeLinear", ["hq", "s2", "z"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(np.array(scale), "s"), numpy_helper.from_array(np.array(zero), "z"),
         numpy_helper.from_array(np.array(np.float32(1e-4)), "s2"),
         numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    path = tmp_path / f"{op}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    x = RNG.uniform(-2, 2, x_shape).astype(np.float32)
    xd = (np.clip(np.round(x / scale) + 128, 0, 255) - 128) * scale
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    expected = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": xd})[0]
    return path, x, expected


def _optimized(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_layers_kept_float_stay_float_when_onnxruntime_optimizes_the_graph(tmp_path, op):
    path, x, expected = _float_layer_after_dq(tmp_path, op)
    # what onnxruntime's WeightBiasQuantization does to such a layer: its weight becomes int8 per tensor, and
    # the channels 1e4x smaller than the largest round to nothing
    unshielded = _optimized(path, x)
    small = np.abs(expected[:, :2]).max()
    assert np.abs(unshielded[:, :2] - expected[:, :2]).max() > 0.1 * small, "onnxruntime no longer quantizes it"
    assert recipes.shield_float_layers(path) == ["kept_float"]
    np.testing.assert_allclose(_optimized(path, x), expected, rtol=1e-4, atol=1e-6)
    assert recipes.shield_float_layers(path) == []  # already shielded: nothing to do


def test_quantized_layers_are_not_shielded(tmp_path):
    from onnxruntime.quantization import QuantFormat, quantize_static

    path, x, _ = _float_layer_after_dq(tmp_path, "Conv")
    model = onnx.load(str(path))
    del model.graph.node[:2]  # a plain float Conv, quantized whole below
    model.graph.node[0].input[0] = "x"
    onnx.save(model, str(path))

    class Feeds:
        it = iter([{"x": RNG.uniform(-2, 2, (1, 3, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(path), str(tmp_path / "q.onnx"), Feeds(), quant_format=QuantFormat.QDQ, per_channel=True)
    assert recipes.shield_float_layers(tmp_path / "q.onnx") == []


def test_preprocess_takes_paths_relative_to_the_callers_folder(tmp_path, monkeypatch):
    from edgeexport.quantize import preprocess

    path, _, _ = _float_layer_after_dq(tmp_path, "Conv")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    preprocess(type(path)(path.name), type(path)("out") / "pre.onnx")  # it works in out/: both names are relative
    assert (tmp_path / "out" / "pre.onnx").is_file()


def test_zeroed_share_tells_a_power_spectrum_from_ordinary_activations():
    """The share of nonzero values one 8-bit range rounds to zero: a few percent for normal, ReLU6 and heavy-tailed
    activations, most of a spectrum spanning decades."""
    assert recipes.zeroed_share(RNG.standard_normal(10000)) < 0.02
    assert recipes.zeroed_share(np.clip(RNG.standard_normal(10000), 0, 6)) < 0.02  # exact zeros do not count
    assert recipes.zeroed_share(RNG.standard_t(3, 100000)) < 0.3
    assert recipes.zeroed_share(RNG.lognormal(0, 3, 10000)) > 0.9
    assert recipes.zeroed_share(10.0 ** -np.linspace(0, 7, 40) * RNG.lognormal(0, 0.5, (16, 40))) > 0.5
    assert recipes.zeroed_share(np.zeros(8)) == 0.0


def test_wide_range_inputs_names_the_layer_and_its_tensor(tmp_path):
    """Only layers with a constant weight whose activation input is too wide are named, graph inputs included; an
    activation x activation MatMul reading the same tensor is not (no int8 kernel quantizes it by this rule)."""
    w = RNG.standard_normal((16, 16)).astype(np.float32)
    model = _graph([helper.make_node("MatMul", ["spec", "w"], ["a"], name="reads_spectrum"),
                    helper.make_node("Relu", ["a"], ["r"], name="relu"),
                    helper.make_node("MatMul", ["r", "w"], ["b"], name="reads_relu"),
                    helper.make_node("MatMul", ["spec", "b"], ["c"], name="two_activations")],
                   [_vi("spec", [16, 16])], [_vi("c", [16, 16])], {"w": w})
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    feeds = [{"spec": (10.0 ** -np.linspace(0, 6, 16) * RNG.lognormal(0, 0.5, (16, 16))).astype(np.float32)}
             for _ in range(3)]
    found = recipes.wide_range_inputs(path, feeds, ["MatMul"])
    assert list(found) == ["reads_spectrum"] and found["reads_spectrum"]["tensor"] == "spec"
    assert found["reads_spectrum"]["zeroed_share"] > 0.5 and found["reads_spectrum"]["lowest"] > 0
    assert "reads_relu" not in found
    assert "log scale" in recipes.wide_range_note(found)
