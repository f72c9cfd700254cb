"""SmoothQuant for ONNX graphs: move activation outliers into the weights before int8 quantization.

Transformer activations (LayerNorm outputs above all) carry a few channels 10-100x larger than the rest; one 8-bit
range per tensor spends its levels on them and rounds every ordinary channel coarsely. SmoothQuant (Xiao et al.
2023) divides each input channel ``j`` of a weighted MatMul by ``s_j`` and multiplies row ``j`` of its weight by
``s_j``: ``(x / s) @ (s * W) == x @ W`` exactly in float, but the activation's channels now have comparable ranges
and the weight, quantized per output channel, absorbs the outliers. ``s_j = max|x_j|^a / max|W_j|^(1-a)``, with the
maxima taken over calibration samples and over every MatMul that reads ``x`` (Q, K and V share one ``s``).

Here the division is an explicit ``Mul`` by ``1/s`` in front of each group of MatMuls, so it works on any graph
(a residual branch that also reads a LayerNorm's output keeps the unscaled tensor). On all-MiniLM-L6-v2 it moved
dynamic int8's sentence-embedding cosine from 0.991 to 0.997 and static int8's from 0.989 to 0.996.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from edgeexport.onnxgraph import attr as _attr

#: migration strengths tried per activation tensor (0.5 in the paper for most models, 0.75-0.85 where outliers are
#: larger); None is "leave this tensor alone", chosen when no strength lowers the simulated error. The simulated
#: error of one layer keeps falling up to 0.9 on MiniLM, but end to end 0.9 was worse than 0.7-0.8 (static int8
#: cosine 0.9939 vs 0.9972/0.9964): strengths above 0.8 move too much rounding into the weights.
ALPHAS: tuple = (None, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: smoothing must lower a tensor's simulated error this many times (differences below ~1.15x are rounding noise
#: between strengths on tensors without outliers)
MIN_GAIN = 1.25
#: calibration samples the activation statistics are taken from, and rows of each kept for the simulation
SAMPLES = 64
ROWS_PER_FEED = 32
#: bounds on the per-channel factor (a dead channel, or a zero weight row, keeps factor 1)
S_MIN, S_MAX = 1e-4, 1e4


def _transposed(node: Any) -> bool:
    """True when the node's constant weight is stored ``[N, K]`` (Gemm with transB=1)."""
    return node.op_type == "Gemm" and _attr(node, "transB", 0) == 1


def groups(model: Any) -> dict[str, list[Any]]:
    """activation tensor -> the MatMul (and Gemm, transA=0) nodes that multiply it by a constant 2-D weight."""
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, list[Any]] = {}
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2 or n.input[0] in inits:
            continue
        if n.op_type == "Gemm" and (_attr(n, "transA", 0) or _attr(n, "alpha", 1.0) != 1.0):
            continue
        w = inits.get(n.input[1])
        if w is not None and len(w.dims) == 2:
            out.setdefault(n.input[0], []).append(n)
    return {x: ms for x, ms in out.items()
            if len({inits[m.input[1]].dims[1 if _transposed(m) else 0] for m in ms}) == 1}


def _weight(node: Any, init: Any) -> np.ndarray:
    """The node's weight as ``[K, N]``."""
    from onnx import numpy_helper

    w = numpy_helper.to_array(init).astype(np.float32)
    return w.T if _transposed(node) else w


def channel_stats(model_path: Path, names: list[str], feeds: Iterable[dict[str, np.ndarray]],
                  rows_per_feed: int = ROWS_PER_FEED) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """(lowest and highest value of each last-axis channel ``[2, K]``, a fixed sample of rows ``[R, K]``) of each
    tensor in ``names`` over ``feeds``, and the number of feeds."""
    import onnx

    from edgeexport.onnxgraph import exposing_session

    sess, _ = exposing_session(onnx.load(str(model_path)), names)
    rng = np.random.default_rng(0)
    top: dict[str, np.ndarray] = {}
    rows: dict[str, list[np.ndarray]] = {}
    count = 0
    for feed in feeds:
        for name, v in zip(names, sess.run(names, {i.name: feed[i.name] for i in sess.get_inputs()})):
            v = np.asarray(v, dtype=np.float32)
            v = v.reshape(-1, v.shape[-1])
            a = np.stack([v.min(axis=0), v.max(axis=0)])
            top[name] = np.stack([np.minimum(top[name][0], a[0]), np.maximum(top[name][1], a[1])]) \
                if name in top else a
            pick = rng.choice(len(v), size=min(rows_per_feed, len(v)), replace=False)
            rows.setdefault(name, []).append(v[pick])
        count += 1
    return top, {k: np.concatenate(v) for k, v in rows.items()}, count


def factors(act_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """Per-channel smoothing factors ``s`` (``x / s``, ``W * s``); 1 where either maximum is zero."""
    a = act_max.astype(np.float64)
    w = weight_max.astype(np.float64)
    ok = (a > 0) & (w > 0)
    s = np.ones_like(a)
    s[ok] = np.clip(a[ok] ** alpha / w[ok] ** (1 - alpha), S_MIN, S_MAX)
    return s


def _fake_quant_rows(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Per-tensor asymmetric uint8 quantize-dequantize over [lo, hi] (ORT's static and dynamic int8 activations)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255 or 1.0
    zero = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def _fake_quant_weight(w: np.ndarray) -> np.ndarray:
    """Symmetric per-output-channel int8 quantize-dequantize of a ``[K, N]`` weight."""
    scale = np.abs(w).max(axis=0, keepdims=True) / 127
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(w / scale), -127, 127) * scale


def simulated_error(rows: np.ndarray, bounds: np.ndarray, weights: list[np.ndarray], s: np.ndarray) -> float:
    """Relative squared error of ``rows @ W`` for every W of a group when ``rows / s`` (whose channels span
    ``bounds`` ``[2, K]`` over calibration) and ``W * s`` are int8."""
    xq = _fake_quant_rows(rows / s, float((bounds[0] / s).min()), float((bounds[1] / s).max()))
    err = ref = 0.0
    for w in weights:
        y = rows @ w
        d = xq @ _fake_quant_weight(w * s[:, None]) - y
        err += float(np.sum(d * d))
        ref += float(np.sum(y * y))
    return err / ref if ref else 0.0


def choose(rows: np.ndarray, bounds: np.ndarray, weights: list[np.ndarray], alphas: Iterable = ALPHAS
           ) -> tuple[Any, np.ndarray, dict]:
    """The strength (None: no smoothing) whose factors give the smallest simulated int8 error, its factors, and
    the error of each strength tried."""
    act_max = np.abs(bounds).max(axis=0)
    w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    plain = np.ones(len(act_max))
    tried = {"none": simulated_error(rows, bounds, weights, plain.astype(np.float32))}
    best: tuple[float, Any, np.ndarray] = (np.inf, None, plain)
    for alpha in alphas:
        if alpha is not None:
            s = factors(act_max, w_max, alpha)
            tried[alpha] = e = simulated_error(rows, bounds, weights, s.astype(np.float32))
            best = min(best, (e, alpha, s), key=lambda t: t[0])
    if None in alphas and tried["none"] < MIN_GAIN * best[0]:
        best = (tried["none"], None, plain)  # within the rounding noise of no smoothing: not worth a Mul
    return best[1], best[2], tried


def smooth(src: Path, dst: Path, feeds: Iterable[dict[str, np.ndarray]], alphas: Iterable = ALPHAS
           ) -> dict[str, Any]:
    """Write ``src`` smoothed to ``dst`` (which may be ``src``): each activation tensor read by constant-weight
    MatMuls gets the strength from ``alphas`` that minimizes the simulated int8 error of those MatMuls on the
    calibration rows. Returns what was done, for the manifest."""
    import onnx
    from onnx import helper, numpy_helper

    alphas = tuple(alphas)
    model = onnx.load(str(src))
    found = groups(model)
    record: dict[str, Any] = {"alphas_tried": [a for a in alphas if a is not None], "smoothed_matmuls": 0,
                              "activation_tensors": 0}
    if not found:
        if Path(dst) != Path(src):
            onnx.save(model, str(dst))
        return {"smoothquant": {**record, "skipped": "no MatMul with a constant 2-D weight"}}
    bounds, rows, samples = channel_stats(src, sorted(found), feeds)
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    chosen: dict[str, Any] = {}
    gain = []
    new_nodes: dict[str, Any] = {}  # activation tensor -> its Mul node
    for x, matmuls in sorted(found.items()):
        if x not in bounds or any(uses[m.input[1]] != 1 for m in matmuls):
            continue  # a weight shared with another node cannot be rescaled for this one alone
        weights = [_weight(m, inits[m.input[1]]) for m in matmuls]
        if any(w.shape[0] != bounds[x].shape[1] for w in weights):
            continue
        alpha, s, tried = choose(rows[x], bounds[x], weights, alphas)
        chosen[x] = alpha
        if alpha is None:
            continue
        gain.append(tried["none"] / max(tried[alpha], 1e-30))
        for m, w in zip(matmuls, weights):
            t = inits[m.input[1]]
            scaled = (w * s[:, None]).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(scaled.T.copy() if _transposed(m) else scaled, t.name))
        inv = helper.make_tensor(f"{x}_smooth_scale", onnx.TensorProto.FLOAT, [len(s)], (1.0 / s).astype(np.float32))
        model.graph.initializer.append(inv)
        new_nodes[x] = helper.make_node("Mul", [x, inv.name], [f"{x}_smoothed"], name=f"{x}_smooth")
        for m in matmuls:
            m.input[0] = f"{x}_smoothed"
        record["smoothed_matmuls"] += len(matmuls)
    # each Mul goes right before the first node that reads its output (the graph stays topologically sorted)
    placed: list[Any] = []
    for n in list(model.graph.node):
        placed += [new_nodes.pop(x) for x in [x for x in new_nodes if f"{x}_smoothed" in n.input]]
        placed.append(n)
    del model.graph.node[:]
    model.graph.node.extend(placed)
    onnx.save(model, str(dst))
    picked = [a for a in chosen.values() if a is not None]
    record.update(activation_tensors=len(picked), samples=samples, left_alone=len(chosen) - len(picked),
                  alpha_median=float(np.median(picked)) if picked else None,
                  simulated_error_reduction=f"{np.median(gain):.1f}x (median)" if gain else None)
    return {"smoothquant": record}
