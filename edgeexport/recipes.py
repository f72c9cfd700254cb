"""Int8 recipes for ONNX graphs: which tensors no 8-bit range can hold, which ops to quantize for the graph's
family, bias correction of the weight rounding error, and what share of the model really ended up integer.

Shared by the targets that quantize an ONNX graph (ORT, TensorRT) or hand one to a converter (TFLite); targets
never import each other.

- **Unrepresentable tensors.** A tensor holding -inf/inf/NaN, or a *sentinel*: a few huge values of one magnitude
  (optimum's additive attention mask is ``Where(pad, -3.4e38, 0)``; older BERTs use -10000) with a gap of 100x
  down to every other value. A min/max range spanning a sentinel gives a scale so large that every real value
  quantizes to the zero point (MiniLM: softmax over constant scores, embedding cosine 0.38). Nodes touching them
  stay float.
- **Families.** A graph with Softmax fed by an activation x activation MatMul is a transformer: only the weighted
  MatMul/Gemm (constant weights) are quantized, with float outputs, so attention scores, softmax, LayerNorm and
  GELU stay float. Anything else is quantized whole (every op ORT knows), which keeps CNN pipelines integer.
- **Bias correction.** Rounding the weights shifts each output channel's mean by ``dW . E[x]`` (``dW`` the rounding
  error, ``E[x]`` the mean of each input channel over calibration samples). Subtracting it from the bias (Nagel et
  al. 2019; NNCF's fast bias correction does the same per layer) is exact in expectation and costs nothing at run
  time. On EfficientNet-Lite0 it moved top-1 agreement from 0.92 to 0.96-0.98.
"""

from __future__ import annotations

from math import prod
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np

from edgeexport.flops import COUNTED_OPS as WEIGHTED_OPS  # Conv, ConvTranspose, MatMul, Gemm
from edgeexport.onnxgraph import attr as _attr
from edgeexport.onnxgraph import inferred_infos, output_axis
#: a tensor whose largest magnitude is beyond this holds a sentinel, whatever its other values
SENTINEL_ABS = 1e30
#: sentinel test: the large values (within LARGE_BAND of the maximum) agree to this relative spread ...
SENTINEL_SPREAD = 0.01
LARGE_BAND = 16.0
#: ... and every other value is at least this many times smaller
SENTINEL_GAP = 100.0
SENTINEL_MIN_ABS = 1e3
SENTINEL_MIN_COUNT = 16


def is_unrepresentable(value: np.ndarray) -> bool:
    """True when no single 8- or 16-bit range over ``value`` can keep its ordinary values apart."""
    v = np.asarray(value)
    if v.dtype.kind != "f" or v.size == 0:
        return False
    if not np.isfinite(v).all():
        return True
    a = np.abs(v.astype(np.float64, copy=False)).ravel()
    top = float(a.max())
    if top > SENTINEL_ABS:
        return True
    if top < SENTINEL_MIN_ABS:
        return False
    large = a >= top / LARGE_BAND
    if int(large.sum()) < SENTINEL_MIN_COUNT:
        return False
    if float(a[large].min()) < top * (1 - SENTINEL_SPREAD):
        return False  # the big values vary: an outlier channel, not a sentinel
    rest = a[~large]
    return rest.size > 0 and float(rest.max()) <= top / SENTINEL_GAP  # a constant tensor quantizes exactly


def unrepresentable_nodes(model_path: Path, feeds: list[dict[str, np.ndarray]]) -> tuple[list[str], list[str]]:
    """(nodes that produce or consume an unrepresentable float tensor on ``feeds``, those tensors)."""
    import onnx

    from edgeexport.onnxgraph import exposing_session, float_tensors

    if not feeds:
        return [], []
    model = onnx.load(str(model_path))
    sess, names = exposing_session(model, sorted(float_tensors(model)))
    bad: set[str] = set()
    for feed in feeds:
        for name, value in zip(names, sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})):
            if name not in bad and isinstance(value, np.ndarray) and is_unrepresentable(value):
                bad.add(name)
    nodes = sorted({n.name or n.output[0] for n in model.graph.node if bad & (set(n.output) | set(n.input))})
    return nodes, sorted(bad)


#: an integer layer's input is too wide for 8 bits when more than this share of its nonzero values round to zero
ZEROED_SHARE = 0.5
#: layers whose activation input an int8 kernel quantizes (input 0; their weight is input 1)
INTEGER_INPUT_OPS = (*WEIGHTED_OPS, "LSTM", "GRU", "RNN")


def zeroed_share(value: np.ndarray) -> float:
    """The share of ``value``'s nonzero values that round to zero in the 8-bit range a quantizer gives it,
    [min(0, lowest), max(0, highest)]: 0.02 for ordinary activations, 0.89 for a mel power spectrogram (3e-9..51)."""
    v = np.asarray(value, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    nonzero = v[v != 0]
    if nonzero.size == 0:
        return 0.0
    step = (max(0.0, float(v.max())) - min(0.0, float(v.min()))) / 255
    return float(np.mean(np.abs(nonzero) < step / 2))


def wide_range_inputs(model_path: Path, feeds: list[dict[str, np.ndarray]], op_types: Iterable[str]
                      ) -> dict[str, dict[str, Any]]:
    """Layers of ``op_types`` with a constant weight whose activation input spans too many
    orders of magnitude for one 8-bit range: more than ZEROED_SHARE of its nonzero values round to zero on
    ``feeds`` (averaged over samples, as dynamic quantization ranges each call). A raw power spectrum read by an
    LSTM is one: resemblyzer's speaker encoder gave an embedding cosine of 0.75 at int8-dynamic, 0.9986 with its
    first LSTM kept float. node name -> {tensor, zeroed_share, lowest, highest}."""
    import onnx

    from edgeexport.onnxgraph import exposing_session

    if not feeds:
        return {}
    model = onnx.load(str(model_path))
    consts, types = constant_names(model), set(op_types)
    readers = {n.name or n.output[0]: n.input[0] for n in model.graph.node
               if n.op_type in types and len(n.input) > 1 and n.input[1] in consts and n.input[0]
               and n.input[0] not in consts}
    if not readers:
        return {}
    graph_inputs = {i.name for i in model.graph.input}
    tensors = sorted(set(readers.values()))
    sess, names = exposing_session(model, [t for t in tensors if t not in graph_inputs])
    shares: dict[str, list[float]] = {t: [] for t in tensors}
    bounds: dict[str, list[float]] = {t: [np.inf, -np.inf] for t in tensors}
    for feed in feeds:
        values = dict(zip(names, sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})))
        values.update({t: feed[t] for t in tensors if t in graph_inputs and t in feed})
        for t in tensors:
            v = values.get(t)
            if isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.size:
                shares[t].append(zeroed_share(v))
                bounds[t] = [min(bounds[t][0], float(np.nanmin(v))), max(bounds[t][1], float(np.nanmax(v)))]
    return {node: {"tensor": t, "zeroed_share": round(float(np.mean(shares[t])), 4), "lowest": bounds[t][0],
                   "highest": bounds[t][1]}
            for node, t in readers.items() if shares[t] and np.mean(shares[t]) > ZEROED_SHARE}


def wide_range_note(found: dict[str, dict[str, Any]]) -> str:
    """One line saying which layers stay float for their input's range, and what would let them quantize."""
    parts = [f"{node} ({v['tensor']}: {100 * v['zeroed_share']:.0f}% of its nonzero values round to zero; "
             f"range {v['lowest']:.3g}..{v['highest']:.3g})" for node, v in list(found.items())[:4]]
    return (f"kept {len(found)} layer(s) in float because their input spans too many orders of magnitude for one "
            f"8-bit range: {'; '.join(parts)}{' ...' if len(found) > 4 else ''}. A log scale (e.g. log-mel instead "
            "of a power spectrogram) or a normalization before the model would let them quantize")


#: the layers onnxruntime's WeightBiasQuantization quantizes when their float weight follows a DequantizeLinear
SHIELDED_OPS = ("Conv", "ConvTranspose", "Gemm")


def shield_float_layers(path: Path) -> list[str]:
    """Keep the float Conv/ConvTranspose/Gemm layers of a Q/DQ graph float when onnxruntime runs it; rewrites
    ``path`` and returns the names of the layers it shielded.

    onnxruntime (1.2x and later, every optimization level above none) runs ``WeightBiasQuantization`` on a Conv,
    ConvTranspose or Gemm with a float weight initializer whose input comes from a DequantizeLinear with a scalar
    scale: it quantizes that weight to int8 **per tensor** at session creation. A layer kept float on purpose
    (``exclude_nodes``, the accuracy budget's fallback, a non-finite exclusion) then runs with the coarsest int8
    weights there are: EfficientNet-Lite0 with its first depthwise conv kept float fell from 26 to 6.8 dB. The
    transformer only matches a scalar input scale, so each such layer gets its own DequantizeLinear with the same
    scale and zero point repeated along one axis of its input (the same values, per-axis): the graph means what
    it meant, and onnxruntime leaves the layer float."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    targets = []
    for node in model.graph.node:
        if node.op_type not in SHIELDED_OPS or len(node.input) < 2:
            continue
        weight, dq = inits.get(node.input[1]), producer.get(node.input[0])
        if weight is None or weight.data_type != onnx.TensorProto.FLOAT or dq is None or dq.op_type != "DequantizeLinear":
            continue
        scale = inits.get(dq.input[1])
        if scale is not None and numpy_helper.to_array(scale).size == 1:
            targets.append((node, dq))
    if not targets:
        return []
    dims = {vi.name: [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
            for vi in inferred_infos(model)}

    def axis_of(node: Any) -> Optional[int]:  # an input axis longer than 1 (a length-1 scale counts as scalar)
        shape = dims.get(node.input[0], [])
        return next((a for a in (1, *range(len(shape))) if a < len(shape) and shape[a] > 1), None)

    axes = [axis_of(node) for node, _ in targets]
    unshielded = [node.name for (node, _), axis in zip(targets, axes) if axis is None]
    if unshielded:
        from edgeexport.errors import TargetError

        raise TargetError(f"cannot keep {', '.join(unshielded)} in float on onnxruntime",
                          "shape inference does not know the input shape these layers would be shielded by (onnxruntime "
                          "would quantize their weights per tensor)", "export with static input shapes, or drop these "
                          "nodes from exclude_nodes")
    position = {id(n): i for i, n in enumerate(model.graph.node)}
    inserts: list[tuple[int, Any]] = []
    for (node, dq), axis in zip(targets, axes):
        assert axis is not None  # refused above
        shape = dims[node.input[0]]
        scale = numpy_helper.to_array(inits[dq.input[1]]).reshape(())
        tag = f"{node.name or node.output[0]}_float_input"
        names = [f"{tag}_scale"]
        model.graph.initializer.append(numpy_helper.from_array(np.full(shape[axis], scale, scale.dtype), names[0]))
        if len(dq.input) > 2 and dq.input[2]:
            zero = numpy_helper.to_array(inits[dq.input[2]]).reshape(())
            names.append(f"{tag}_zero_point")
            model.graph.initializer.append(numpy_helper.from_array(np.full(shape[axis], zero, zero.dtype), names[1]))
        own = onnx.helper.make_node("DequantizeLinear", [dq.input[0], *names], [tag], name=f"{tag}_dq", axis=axis)
        node.input[0] = tag
        inserts.append((position[id(node)], own))
    for index, own in sorted(inserts, key=lambda x: -x[0]):  # each before its consumer: the order stays topological
        model.graph.node.insert(index, own)
    onnx.save(model, str(path))
    return [node.name for node, _ in targets]


def constant_names(model: Any) -> set[str]:
    """The tensors of ``model`` that are constants: initializers and Constant node outputs."""
    return {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                        for o in n.output}


def weighted_nodes(model: Any) -> list[str]:
    """Names of Conv/ConvTranspose/Gemm/MatMul nodes whose weight (second input) is a constant."""
    consts = constant_names(model)
    return [n.name for n in model.graph.node
            if n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in consts and n.name]


def table_gathers(model: Any) -> list[str]:
    """Names of the Gather nodes that read an embedding table (a constant of at least TABLE_MIN_ELEMENTS)."""
    sizes = {t.name: prod(t.dims) for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "Gather" and n.name and sizes.get(n.input[0], 0) >= TABLE_MIN_ELEMENTS]


def family(model: Any) -> str:
    """'transformer' when a Softmax reads the product of two activations (attention), else 'cnn'."""
    consts = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    act_matmuls = {n.output[0] for n in model.graph.node
                   if n.op_type == "MatMul" and len(n.input) > 1 and not {n.input[0], n.input[1]} & consts}
    for n in model.graph.node:
        if n.op_type != "Softmax":
            continue
        todo, seen = [n.input[0]], set[str]()
        while todo:  # walk back through scaling, masking and reshapes to the scores' MatMul
            name = todo.pop()
            if name in act_matmuls:
                return "transformer"
            src = producer.get(name)
            if src is None or name in seen or len(seen) > 8:
                continue
            seen.add(name)
            if src.op_type in ("Add", "Mul", "Div", "Where", "Reshape", "Transpose", "Cast", "Sub"):
                todo += [i for i in src.input if i and i not in consts]
    return "cnn"


def calib_method(requested: str, graph_family: str) -> str:
    """The activation-range method for ``--calib-method auto``: percentile (99.999) for CNNs, whose linear
    bottlenecks and residual sums have rare extremes that min/max spends the range on (EfficientNet-Lite0, 1024
    held-out crops, GPTQ weights: ORT SNR 25.3 -> 26.2 dB, TFLite 24.6 -> 25.6 dB); minmax for transformers,
    whose outlier channels SmoothQuant moves and whose extremes carry the attention."""
    if requested != "auto":
        return requested
    return "percentile" if graph_family == "cnn" else "minmax"


def output_op_types(model: Any) -> list[str]:
    """Op types of the weighted nodes that produce graph outputs (their outputs are left unquantized)."""
    outs = {o.name for o in model.graph.output}
    producer = {o: n for n in model.graph.node for o in n.output}
    types = set()
    for name in outs:
        node = producer.get(name)
        # through a trailing reshape/flatten/identity to the layer that computes it
        while node is not None and node.op_type in ("Reshape", "Flatten", "Identity", "Squeeze") and node.input:
            node = producer.get(node.input[0])
        if node is not None and node.op_type in WEIGHTED_OPS:
            types.add(node.op_type)
    return sorted(types)


def dequantized_weights(qdq_model: Any) -> dict[str, np.ndarray]:
    """node name -> the weight its runtime will use (the DequantizeLinear of its constant weight input)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in qdq_model.graph.initializer}
    deq: dict[str, np.ndarray] = {}
    for n in qdq_model.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[n.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        zp = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64) if len(n.input) > 2 and n.input[2] else 0.0
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * q.ndim
            shape[_attr(n, "axis", 1) % q.ndim] = -1
            scale = scale.reshape(shape)
            zp = np.reshape(zp, shape) if np.ndim(zp) else zp
        deq[n.output[0]] = (q - zp) * scale
    return {n.name: deq[n.input[1]] for n in qdq_model.graph.node
            if n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in deq and n.name}


def rounded_weights(model: Any, qmax: int = 127) -> dict[str, np.ndarray]:
    """node name -> its weight after symmetric per-output-channel rounding to [-qmax, qmax] (TFLite's and
    TensorRT's int8 weight scheme), for converters whose quantizer cannot be asked what it will do."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        axis = output_axis(n)
        wm = np.moveaxis(w, axis, 0)
        scale = np.abs(wm).reshape(wm.shape[0], -1).max(axis=1) / qmax
        scale = np.where(scale > 0, scale, 1.0).reshape((-1,) + (1,) * (wm.ndim - 1))
        out[n.name] = np.moveaxis(np.clip(np.round(wm / scale), -qmax, qmax) * scale, 0, axis)
    return out


def _channel_means(model_path: Path, axes: dict[str, int], feeds: Iterable[dict[str, np.ndarray]]
                   ) -> tuple[dict[str, np.ndarray], int]:
    """Mean of each channel (tensor name -> channel axis: 1 for NC.. conv inputs, -1 for features) over ``feeds``,
    and how many feeds there were."""
    import onnx

    from edgeexport.onnxgraph import exposing_session

    names = sorted(axes)
    sess, _ = exposing_session(onnx.load(str(model_path)), names)
    sums: dict[str, np.ndarray] = {}
    count = 0
    for feed in feeds:
        values = sess.run(names, {i.name: feed[i.name] for i in sess.get_inputs()})
        for name, v in zip(names, values):
            v = np.moveaxis(np.asarray(v, dtype=np.float64), axes[name], 0)
            sums[name] = sums.get(name, 0.0) + v.reshape(v.shape[0], -1).mean(axis=1)
        count += 1
    return {k: v / max(count, 1) for k, v in sums.items()}, count


BIAS_SAMPLES = 64


def _bias_of(node: Any, inits: dict[str, Any], consumers: dict[str, list]) -> Optional[Any]:
    """The bias initializer of a Conv/Gemm (third input) or of a MatMul's only consumer Add(x, [O] constant)."""
    if node.op_type in ("Conv", "Gemm"):
        return inits.get(node.input[2]) if len(node.input) > 2 else None
    users = consumers.get(node.output[0], [])
    if node.op_type != "MatMul" or len(users) != 1 or users[0].op_type != "Add":
        return None
    other = [inits.get(i) for i in users[0].input if i != node.output[0]]
    return other[0] if len(other) == 1 and other[0] is not None and len(other[0].dims) == 1 else None


def _shift(node: Any, dw: np.ndarray, mu: np.ndarray) -> Optional[np.ndarray]:
    """The mean output shift per output channel that weight error ``dw`` causes on inputs of channel means ``mu``."""
    if node.op_type == "Conv":
        groups = _attr(node, "group", 1)
        cout, cin_g = dw.shape[:2]
        if mu.shape[0] != groups * cin_g:
            return None
        mu_o = np.repeat(mu.reshape(groups, cin_g), cout // groups, axis=0)  # [cout, cin/group]
        return np.einsum("oi,oi->o", dw.reshape(cout, cin_g, -1).sum(-1), mu_o)
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            return None
        return (dw if _attr(node, "transB", 0) else dw.T) @ mu
    return dw.T @ mu if dw.ndim == 2 and dw.shape[0] == mu.shape[0] else None  # MatMul: x [.., I] @ W [I, O]


def bias_correct(float_path: Path, dst: Path, quantized: dict[str, np.ndarray],
                 feeds: Iterable[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Write ``float_path`` with each Conv/Gemm bias (and each MatMul's Add bias) minus the mean shift its weight
    rounding causes. ``quantized`` maps node names to the weights the runtime will use. Layers without a bias are
    left alone (one would have to be added). Returns what was done, for the manifest."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(float_path))
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    todo = [(n, b) for n in model.graph.node if n.name in quantized and n.op_type in ("Conv", "Gemm", "MatMul")
            and len(n.input) > 1 and n.input[1] in inits and (b := _bias_of(n, inits, consumers)) is not None]
    used: dict[str, int] = {}
    for _, b in todo:
        used[b.name] = used.get(b.name, 0) + 1
    todo = [(n, b) for n, b in todo if used[b.name] == 1]  # a bias shared by two layers cannot serve both
    axes = {n.input[0]: 1 if n.op_type == "Conv" else -1 for n, _ in todo}
    means, samples = _channel_means(float_path, axes, feeds) if todo else ({}, 0)
    corrected = 0
    for n, bias in todo:
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        dw, mu = quantized[n.name] - w, means.get(n.input[0])
        shift = _shift(n, dw, mu) if mu is not None and dw.shape == w.shape else None
        b = numpy_helper.to_array(bias).astype(np.float64)
        if shift is None or b.shape != shift.shape:
            continue
        bias.CopyFrom(numpy_helper.from_array((b - shift).astype(np.float32), bias.name))
        corrected += 1
    onnx.save(model, str(dst))
    return {"bias_correction": "dW . E[x] subtracted from each bias", "bias_corrected_layers": corrected,
            "bias_correction_samples": samples}


def correct_weights(src: Path, dst: Path, nearest: dict[str, np.ndarray], grids: dict[str, Any], calibration: Any,
                    bias_correction: bool, rounding: str) -> tuple[Path, dict[str, Any]]:
    """``src`` with its weights rounded by GPTQ on ``grids`` (``rounding='gptq'``) and/or each bias corrected
    (``bias_correction``) for the weights the runtime will hold (GPTQ's, else ``nearest``: the quantizer's own
    rounding), written to ``dst``. Returns the graph to quantize or convert (``src`` when nothing changed) and the
    manifest's record of it. Shared by the Q/DQ targets and TFLite, whose converter quantizes what it is given."""
    from edgeexport import gptq

    done: dict[str, Any] = {"bias_correction": False, "weight_rounding": "nearest"}
    weights = dict(nearest)
    rounded: dict[str, np.ndarray] = {}
    if rounding == "gptq":
        rounded, info = gptq.round_weights(src, grids, take(calibration.calibration(), gptq.SAMPLES))
        weights.update(rounded)
        done.update(info)
    if bias_correction:
        done.update(bias_correct(src, dst, weights, take(calibration.calibration(), BIAS_SAMPLES)))
    if not rounded and not done.get("bias_corrected_layers"):
        return src, done
    gptq.write_weights(dst if bias_correction else src, dst, rounded)
    return dst, done


def integer_share(qdq_path: Path, float_path: Path, feed: dict[str, np.ndarray]) -> dict[str, Any]:
    """What share of the weighted work really runs in integers: multiply-adds and weight bytes of the Conv/Gemm/
    MatMul (and LSTM/GRU) nodes whose data and weight inputs both come from 8-bit DequantizeLinear (or that are
    integer ops, e.g. ConvInteger, DynamicQuantizeLSTM), against all weighted nodes of the float graph. The weight
    bytes also count embedding tables (Gather from a large constant), which an int8 graph may leave float."""
    import onnx

    from edgeexport.flops import RECURRENT_OPS, _node_flops, tensor_shapes

    fmodel = onnx.load(str(float_path))
    integer_nodes = _integer_nodes(onnx.load(str(qdq_path)))
    counted = [n for n in fmodel.graph.node if n.op_type in WEIGHTED_OPS + RECURRENT_OPS]
    shape = tensor_shapes(fmodel, counted, feed)
    weights = {t.name: prod(t.dims) for t in fmodel.graph.initializer}
    # embedding tables (a Gather from a large constant): no multiply-adds, but often most of the weight bytes
    tables = [n for n in fmodel.graph.node
              if n.op_type == "Gather" and weights.get(n.input[0], 0) >= TABLE_MIN_ELEMENTS]
    macs = {"int": 0, "all": 0}
    wbytes = {"int": 0, "all": 0}
    float_layers = []
    for n in counted:
        flops = _node_flops(n, shape)
        wsize = sum(weights.get(i, 0) for i in n.input[1:3] if i) * 4
        macs["all"] += flops // 2
        wbytes["all"] += wsize
        if n.name in integer_nodes:
            macs["int"] += flops // 2
            wbytes["int"] += wsize
        else:
            float_layers.append(n.name)
    float_tables = []
    for n in tables:
        wbytes["all"] += weights[n.input[0]] * 4
        if n.name in integer_nodes:
            wbytes["int"] += weights[n.input[0]] * 4
        else:
            float_tables.append(n.name)

    def share(d: dict[str, int]) -> float:
        return round(d["int"] / d["all"], 4) if d["all"] else 0.0
    return {"integer_mac_share": share(macs), "integer_weight_share": share(wbytes), "weighted_layers": len(counted),
            "float_weighted_layers": len(float_layers), "float_layers_sample": float_layers[:10],
            "embedding_tables": len(tables), "float_embedding_tables": float_tables,
            "macs_per_sample": macs["all"]}


#: a Gather from a constant of at least this many elements is an embedding table (counted in the weight bytes)
TABLE_MIN_ELEMENTS = 4096
_INTEGER_OPS = {"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul",
                "DynamicQuantizeLSTM", "MatMulIntegerToFloat", "QGemm"}


def _integer_nodes(qmodel: Any) -> set[str]:
    """Names (as in the float graph) of weighted nodes that run on 8-bit inputs in ``qmodel``. Dynamic
    quantization renames what it rewrites: '<name>_quant', and a Gemm becomes MatMulInteger '<name>_MatMul_quant'
    plus an Add."""
    from onnx import TensorProto

    inits = {t.name: t for t in qmodel.graph.initializer}
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    q_type = {}
    for n in qmodel.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits:
            q_type[n.output[0]] = inits[n.input[2]].data_type
    eight = {TensorProto.INT8, TensorProto.UINT8}

    def eight_bit(name: str) -> bool:
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return False
        src = dq.input[0]
        if src in inits:
            return inits[src].data_type in eight
        return q_type.get(src) in eight

    out = set()
    for n in qmodel.graph.node:
        base = n.name.removesuffix("_quant")
        if n.op_type == "Gather" and n.input:  # an int8 table, read directly (dynamic) or through a DQ (Q/DQ)
            table = inits.get(n.input[0])
            if (table is not None and table.data_type in eight) or eight_bit(n.input[0]):
                out.add(base)
        elif n.op_type in _INTEGER_OPS:
            out.update((base, base.removesuffix("_MatMul")))
        elif n.op_type in WEIGHTED_OPS and len(n.input) > 1 and eight_bit(n.input[0]) and eight_bit(n.input[1]):
            out.add(base)
    return out


def advise(share: dict[str, Any], threshold: float = 0.5) -> Optional[str]:
    """A plain note when most of the weighted work, or most of the weight bytes, stayed float (None otherwise)."""
    s = share.get("integer_mac_share", 1.0)
    w = share.get("integer_weight_share", 1.0)
    if s < threshold:
        return (f"only {s:.0%} of the multiply-adds ({w:.0%} of the weight bytes) run in int8; "
                f"{share['float_weighted_layers']} of {share['weighted_layers']} weighted layers stayed float "
                f"(e.g. {', '.join(share['float_layers_sample'][:3])})")
    if w < threshold:
        tables = share.get("float_embedding_tables") or []
        return (f"{s:.0%} of the multiply-adds run in int8 but only {w:.0%} of the weight bytes are int8"
                + (f": the embedding table(s) {', '.join(tables[:3])} stayed float" if tables else ""))
    return None


def record_integer_share(artifact: Any, float_path: Path, calibration: Any) -> None:
    """Count what share of ``artifact``'s model (a Q/DQ or dynamically quantized ONNX made from ``float_path``)
    really runs in int8; record it in its settings and add a plain note when most of it stayed float."""
    record_share(artifact, lambda: integer_share(artifact.model_path, float_path, next(calibration.calibration())))
    share = artifact.settings.get("integer_share")
    if share is not None and not share["integer_mac_share"] and not share["integer_weight_share"]:
        refuse_nothing_integer(artifact, float_path, share)


def refuse_nothing_integer(artifact: Any, float_path: Path, share: dict[str, Any]) -> None:
    """An "int8" build in which no multiply-add and no weight byte is integer is a float model under an int8
    name: refuse it, saying where the model's work is."""
    import onnx

    from edgeexport.errors import TargetError

    from edgeexport.flops import subgraph_weighted_ops

    nested = subgraph_weighted_ops(onnx.load(str(float_path)))
    if nested:
        where = ", ".join(f"{n} {op}" for op, n in sorted(nested.items()))
        why = (f"the model's weighted layers ({where}) sit inside control-flow subgraphs (If/Loop/Scan bodies), "
               "which the quantizer does not rewrite; only the top-level graph is quantized, and it has "
               f"{share['weighted_layers']} weighted layer(s)")
        fix = ("export the model with the branch taken as a plain graph (for example trace it with its constant "
               "inputs fixed, so no If remains), or build --precision fp16 / fp32")
    else:
        why = (f"none of the {share['weighted_layers']} weighted layer(s) was quantized"
               if share["weighted_layers"] else "the model has no Conv, Gemm, MatMul or recurrent layer to quantize")
        fix = "build --precision fp16 or fp32 (there is nothing for int8 to speed up)"
    raise TargetError(f"{artifact.target}/{artifact.precision}: nothing in the built model runs in integers", why, fix)


def record_share(artifact: Any, count: Callable[[], dict[str, Any]]) -> None:
    """Record ``count()`` (a target's integer-share measurement) in ``artifact``'s settings, with a plain note when
    most of the model stayed float; a count that fails is a note, never a failed build."""
    try:
        share = count()
    except Exception as e:  # informational: an uncountable graph must not fail the build
        artifact.notes.append(f"integer share not counted ({type(e).__name__}: {str(e)[:120]})")
        return
    artifact.settings["integer_share"] = share
    note = advise(share)
    if note:
        artifact.notes.append(note)


def take(feeds: Iterable[dict[str, np.ndarray]], n: int) -> list[dict[str, np.ndarray]]:
    return [f for f, _ in zip(feeds, range(n))]


