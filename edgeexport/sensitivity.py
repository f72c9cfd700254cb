"""Per-layer error of a quantized ONNX graph against the float graph it was made from.

Both graphs run on the same inputs with every intermediate float tensor exposed as an output; tensors are matched
by name (ORT's Q/DQ pass keeps each original tensor's name on the node that produces it). A layer is a node, plus
a weighted op feeding it as its only consumer's activation (Gemm+Relu), plus nodes the quantizer fused away. For
each layer:

- ``snr_db``: the signal-to-noise ratio of its output in the quantized graph against the float graph;
- ``input_snr_db``: the worst SNR among its activation inputs (a graph input is exact);
- ``added_noise``: the noise power (relative to the signal) of its output minus that of its worst input, i.e. the
  error that grew through this node on top of what reached it (``added_noise_db`` is the same in dB: -50 is
  negligible, 0 means the noise is as large as the signal);
- ``local_noise``: the noise this layer's own quantization makes when it is fed exact (float) inputs: its output's
  Q/DQ pair applied to the float output, plus its weights' rounding (and a graph input's Q/DQ, for the layer that
  reads it). This isolates the cause: once one tensor is destroyed (an outlier channel squeezing the others onto
  a few levels), every later layer's ``added_noise`` grows as the error propagates and is amplified, and a
  ranking by it names layers downstream of the culprit.

SNRs are per channel, averaged over channels, so that one outlier channel cannot hide the loss of all the others.
Nodes are ranked by ``local_noise`` (then ``added_noise``): the top ones are where quantization destroys
information, and the first to give 16-bit activations or keep in float. The
quantized graph runs with onnxruntime's graph optimizations off, so each Q/DQ pair acts exactly as written
(fake-quantization), which is what the ranking needs: where the error enters, not how a kernel fuses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from edgeexport.flops import COUNTED_OPS

_CAP = 200.0
_SKIP_OPS = {"QuantizeLinear", "DequantizeLinear", "Constant", "Shape", "Identity"}


def _session(model: Any, names: Optional[set[str]] = None) -> tuple[Any, list[str]]:
    """A session of ``model`` that also outputs every float node output (or only those in ``names``)."""
    from edgeexport.onnxgraph import exposing_session, float_tensors

    floats = float_tensors(model)
    return exposing_session(model, [out for n in model.graph.node for out in n.output
                                    if out in floats and (names is None or out in names)])


def _run(sess: Any, outs: list[str], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    values = sess.run(outs, {i.name: feed[i.name] for i in sess.get_inputs()})
    return {n: v for n, v in zip(outs, values) if isinstance(v, np.ndarray) and v.dtype.kind == "f"}


def _channels(x: np.ndarray) -> np.ndarray:
    """[N, C, ...] -> [C, rest]; token activations [N, S, H] -> [H, rest] (features on the last axis)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim <= 1:
        return x.reshape(1, -1)
    axis = -1 if x.ndim == 3 else 1
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


class _ChannelSNR:
    """Per-channel signal and noise energy, accumulated sample by sample (memory: one sample at a time)."""

    def __init__(self) -> None:
        self.signal: Optional[np.ndarray] = None
        self.noise: Optional[np.ndarray] = None
        self.finite = True
        self.measurable = True  # False when the float reference itself holds inf/NaN (e.g. an additive mask)

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        r, g = _channels(ref), _channels(got)
        if r.shape != g.shape:
            self.finite = False
            return
        if not np.isfinite(r).all() or np.abs(r).max(initial=0.0) > 1e30:
            self.measurable = False
            return
        self.finite &= bool(np.isfinite(g).all())
        s, n = np.sum(r * r, axis=1), np.sum((g - r) ** 2, axis=1)
        self.signal = s if self.signal is None else self.signal + s
        self.noise = n if self.noise is None else self.noise + n

    def db(self) -> float:
        """Mean over channels of each channel's SNR. Channel-wise, because one outlier channel would otherwise
        dominate a tensor-wide SNR while every other channel is lost."""
        if not self.finite or self.signal is None:
            return -_CAP
        signal, noise = self.signal, self.noise
        assert noise is not None  # set together with signal
        exact = noise <= 1e-30 * np.maximum(signal, 1.0)
        with np.errstate(divide="ignore", over="ignore"):
            per = np.where(exact, _CAP, 10 * np.log10(np.maximum(signal, 1e-30) / np.where(exact, 1.0, noise)))
        live = signal > 0  # channels that are always zero carry nothing to lose (e.g. dead ReLUs)
        return float(np.clip(np.mean(per[live]) if live.any() else _CAP, -_CAP, _CAP))


def snr_db(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    acc = _ChannelSNR()
    for r, g in zip(ref, got):
        acc.add(r, g)
    return acc.db()


def _as_consumed(quant_model: Any) -> dict[str, str]:
    """float tensor name -> the tensor its consumers read in the quantized graph (its Q -> DQ output, if any)."""
    q_input = {n.output[0]: n.input[0] for n in quant_model.graph.node if n.op_type == "QuantizeLinear"}
    seen: dict[str, str] = {}
    for n in quant_model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in q_input:
            seen.setdefault(q_input[n.input[0]], n.output[0])
    return seen


def _activation_qparams(quant_model: Any) -> dict[str, tuple[np.ndarray, np.ndarray, int, int]]:
    """float tensor name -> (scale, zero point, qmin, qmax) of the QuantizeLinear that quantizes it."""
    from onnx import TensorProto, numpy_helper

    bounds = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127), TensorProto.UINT16: (0, 65535),
              TensorProto.INT16: (-32768, 32767)}
    inits = {t.name: t for t in quant_model.graph.initializer}
    out: dict[str, Any] = {}
    for n in quant_model.graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits or len(n.input) < 3 or n.input[1] not in inits \
                or n.input[2] not in inits or inits[n.input[2]].data_type not in bounds:
            continue
        scale = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        if scale.size != 1:
            continue  # per-channel activations: not what the Q/DQ passes here produce
        out.setdefault(n.input[0], (scale, numpy_helper.to_array(inits[n.input[2]]).astype(np.float64),
                                    *bounds[inits[n.input[2]].data_type]))
    return out


def fake_quant(x: np.ndarray, qp: tuple[np.ndarray, np.ndarray, int, int]) -> np.ndarray:
    scale, zero, lo, hi = qp
    return (np.clip(np.round(np.asarray(x, np.float64) / scale) + zero, lo, hi) - zero) * scale


def _weight_noise(fmodel: Any, qmodel: Any) -> dict[str, float]:
    """weighted node -> the relative noise power of its rounded weight, averaged over output channels."""
    from onnx import numpy_helper

    from edgeexport.onnxgraph import output_axis
    from edgeexport.recipes import dequantized_weights

    inits = {t.name: t for t in fmodel.graph.initializer}
    nodes = {n.name: n for n in fmodel.graph.node}
    out = {}
    for name, wq in dequantized_weights(qmodel).items():
        node = nodes.get(name)
        if node is None or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        if w.shape != wq.shape or w.ndim < 2:
            continue
        axis = output_axis(node)
        d = np.moveaxis(wq - w, axis, 0).reshape(w.shape[axis], -1)
        r = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        signal = np.sum(r * r, axis=1)
        live = signal > 0
        out[name] = float(np.mean(np.sum(d * d, axis=1)[live] / signal[live])) if live.any() else 0.0
    return out


def rank_layers(float_model: Path, quant_model: Path, feeds: Iterable[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    """Compute nodes of the float graph, ranked by the error they add in the quantized graph (worst first).

    A node's output is measured as its consumers read it: after its Q/DQ pair when the quantizer put one there.
    So a layer whose output quantizes badly (e.g. one huge outlier channel squeezing the rest of the range) is the
    one that adds the error, not the layer after it. Each row also lists ``float_fallback``: the nodes to keep in
    float so that the layer's output is never quantized (the layer, what was fused into it, and every consumer of
    its output: with Q/DQ, a tensor stays float only when every node reading it is float)."""
    import onnx

    fmodel = onnx.load(str(float_model))
    fsess, fouts = _session(fmodel)
    qmodel = onnx.load(str(quant_model))
    seen = _as_consumed(qmodel)
    qsess, qouts = _session(qmodel, names=set(fouts) | set(seen.values()))
    graph_inputs = {i.name for i in fmodel.graph.input}
    weights = {i.name for i in fmodel.graph.initializer}
    qparams = _activation_qparams(qmodel)
    acc: dict[str, _ChannelSNR] = {}
    local: dict[str, _ChannelSNR] = {}
    for feed in feeds:
        ref, got = _run(fsess, fouts, feed), _run(qsess, qouts, feed)
        ref.update({i: np.asarray(feed[i]) for i in graph_inputs if i in qparams and i in feed})
        for name, r in ref.items():
            g = got.get(seen.get(name, name))
            if g is not None:
                acc.setdefault(name, _ChannelSNR()).add(r, g)
            if name in qparams and r.dtype.kind == "f":
                local.setdefault(name, _ChannelSNR()).add(r, fake_quant(r, qparams[name]))
    snr = {name: a.db() for name, a in acc.items() if a.measurable and name not in graph_inputs}
    local_noise = {name: 10 ** (-a.db() / 10) for name, a in local.items() if a.measurable}
    weight_noise = _weight_noise(fmodel, qmodel)
    producer = {o: n for n in fmodel.graph.node for o in n.output}
    depth_of = {id(n): i for i, n in enumerate(fmodel.graph.node)}
    absorbed = _activation_pairs(fmodel.graph, producer)
    consumers: dict[str, list] = {}
    for n in fmodel.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    rows: list[dict[str, Any]] = []
    for node in fmodel.graph.node:
        out = node.output[0] if node.output else ""
        if node.op_type in _SKIP_OPS or out not in snr or id(node) in absorbed:
            continue
        group, inputs = _fused_group(node, producer, snr, weights, graph_inputs, absorbed)
        ins = [_CAP if i in graph_inputs else snr[i] for i in inputs if i in graph_inputs or i in snr]
        worst_in = min(ins) if ins else _CAP
        head = group[0]
        added = 10 ** (-snr[out] / 10) - 10 ** (-worst_in / 10)  # noise power (relative to signal) this layer adds
        own = (local_noise.get(out, 0.0) + sum(weight_noise.get(n.name, 0.0) for n in group)
               + sum(local_noise.get(i, 0.0) for i in inputs if i in graph_inputs))
        rows.append({"node": head.name or out, "module": module_path(head), "op_type": "+".join(n.op_type for n in group),
                     "nodes": [n.name for n in group], "depth": depth_of[id(head)], "output": out,
                     "snr_db": snr[out], "input_snr_db": worst_in, "added_noise": added,
                     "added_noise_db": 10 * float(np.log10(added)) if added > 0 else -_CAP,
                     "local_noise": own, "local_noise_db": 10 * float(np.log10(own)) if own > 0 else -_CAP,
                     "quantized_output": out in seen,
                     "float_fallback": list(dict.fromkeys([*(n.name for n in group),
                                                           *(n.name for n in consumers.get(out, []) if n.name)]))})
    rows.sort(key=lambda r: (-r["local_noise"], -r["added_noise"], r["depth"]))
    return rows


SCOPE_KEY = "pkg.torch.onnx.name_scopes"  # torch.onnx's record of the module each node came from


def module_path(node: Any) -> str:
    """The PyTorch module a node came from ('encoder.layer.0.attention'), '' when the exporter did not say."""
    import ast

    for prop in node.metadata_props:
        if prop.key == SCOPE_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            return ".".join(str(x) for x in scopes[:-1] if x)
    return ""


ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Elu",
               "Selu", "Softplus", "Mish"}
WEIGHTED = set(COUNTED_OPS)  # the layers that carry weights (and FLOPs)


def _activation_pairs(graph: Any, producer: dict) -> set[int]:
    """Weighted layers whose only consumer is an activation (Gemm -> Relu): one layer, reported under the
    weighted node's name, whether or not the quantizer fused the pair."""
    consumers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    pairs = set()
    for n in graph.node:
        src = producer.get(n.input[0]) if n.op_type in ACTIVATIONS and n.input else None
        if src is not None and src.op_type in WEIGHTED and consumers.get(n.input[0]) == 1:
            pairs.add(id(src))
    return pairs


def _fused_group(node: Any, producer: dict, snr: dict, weights: set, graph_inputs: set, absorbed: set
                 ) -> tuple[list, list[str]]:
    """``node`` plus the producers that belong to it: ones whose outputs vanished from the quantized graph (fused
    into it) and a weighted layer feeding it as an activation; in graph order. Also the group's external inputs."""
    group, inputs, todo = [node], [], [i for i in node.input if i and i not in weights]
    while todo:
        name = todo.pop()
        src = producer.get(name)
        if src is not None and id(src) in absorbed and src not in group:
            group.insert(0, src)
            todo += [i for i in src.input if i and i not in weights]
        elif name in snr or name in graph_inputs or src is None or src.op_type in _SKIP_OPS:
            inputs.append(name)
        elif src not in group:
            group.insert(0, src)
            todo += [i for i in src.input if i and i not in weights]
    return group, inputs


def label(row: dict[str, Any]) -> str:
    return f"{row['module']} / {row['node']}" if row.get("module") else row["node"]


def render_ranking(rows: list[dict[str, Any]], top: int = 10) -> str:
    lines = [f"{'rank':>4}  {'layer (module / ONNX node)':<52} {'op':<16} {'depth':>5} {'SNR dB':>7} {'in dB':>7} "
             f"{'own noise dB':>12} {'added noise dB':>14}"]
    for i, r in enumerate(rows[:top], 1):
        lines.append(f"{i:>4}  {label(r)[-52:]:<52} {r['op_type'][:16]:<16} {r['depth']:>5} {r['snr_db']:>7.2f} "
                     f"{r['input_snr_db']:>7.2f} {r['local_noise_db']:>12.2f} {r['added_noise_db']:>14.2f}")
    return "\n".join(lines)


def depth_plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """SNR of every ranked node's output along the depth of the network (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_depth = sorted(rows, key=lambda r: r["depth"])
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ax.plot([r["depth"] for r in by_depth], [r["snr_db"] for r in by_depth], marker=".", lw=1)
    for r in rows[:3]:
        ax.annotate(label(r)[-32:], (r["depth"], r["snr_db"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("node index in the graph (depth)")
    ax.set_ylabel("output SNR vs float (dB)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
