"""GPTQ weight rounding (Frantar et al. 2022, after Optimal Brain Quantization) for the int8 grids the targets'
quantizers use.

Rounding each weight to its nearest grid point ignores that the layer's inputs are correlated: the output error of
a row ``w`` rounded to ``q`` is ``(w - q) H (w - q)^T`` with ``H = E[x x^T]`` over the layer's real inputs. GPTQ
rounds one input column at a time and moves the error it made onto the columns not yet rounded, weighted by
``H^-1``, so later columns compensate for earlier ones. Each weight still lands on the quantizer's own grid (the
same per-output-channel scale, the same clip), so the converter or quantizer that re-derives the grid from the
weights gets exactly these integers back: the row's largest weight is never moved, which keeps its scale.

Works on Conv (1-D and 2-D, any groups; the inputs are the im2col patches), Gemm (transA=0) and MatMul with a
constant 2-D weight. Bias correction (``recipes.bias_correct``) runs on top of it: GPTQ minimises the error's
energy, the correction removes what is left of its mean.

On EfficientNet-Lite0 (weights rounded, activations float, 256 held-out crops): nearest rounding + bias correction
leaves a logit error std of 0.052, GPTQ + bias correction 0.036. A full-int8 TFLite build's logit error std went
from 0.084 to 0.075.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sized

import numpy as np

from edgeexport.onnxgraph import attr as _attr

SAMPLES = 32  # calibration samples for H: on EfficientNet-Lite0, 16 gave 0.0389 and 64 gave 0.0382 (above)
DAMP = 0.1  # added to H's diagonal, as a share of its mean: 0.01 (the LLM default) overfits 32 images' statistics
BLOCK = 128  # columns rounded before the rest of the matrix is updated at once (same result, fewer passes)
MAX_COLUMNS = 8192  # a layer with more inputs (per group) keeps nearest rounding: its H alone would be 512 MiB+
PASS_BYTES = 1 << 30  # the H matrices gathered in one pass over the samples; more layers take more passes


@dataclass
class Grid:
    """A weight's int8 grid: one scale per output channel and the largest integer, symmetric (zero point 0)."""

    scale: np.ndarray
    qmax: int


def _rows(node: Any, w: np.ndarray) -> np.ndarray:
    """The weight as [output channels, inputs] (a Conv's per output channel [cin/group * kernel])."""
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1)
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        return w
    return w.T  # Gemm transB=0 and MatMul: [I, O]


def _unrows(node: Any, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if node.op_type == "Conv":
        return rows.reshape(shape)
    return rows if node.op_type == "Gemm" and _attr(node, "transB", 0) else rows.T


def _eligible(node: Any, w: np.ndarray) -> bool:
    if node.op_type == "Conv":
        return w.ndim in (3, 4) and _attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET", b"", "")
    if node.op_type == "Gemm":
        return w.ndim == 2 and not _attr(node, "transA", 0)
    return node.op_type == "MatMul" and w.ndim == 2


def max_abs_grids(model: Any, qmax: int = 127) -> dict[str, Grid]:
    """The grids of converters that quantize what they are given (TFLite, TensorRT): symmetric, per output channel,
    scale = max |w| / qmax. Keyed by node name."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in inits:
            w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
            if _eligible(n, w):
                s = np.abs(_rows(n, w)).max(axis=1) / qmax
                out[n.name] = Grid(np.where(s > 0, s, 1.0), qmax)
    return out


def qdq_grids(qdq_model: Any) -> dict[str, Grid]:
    """The grids a Q/DQ graph's weight DequantizeLinear nodes hold (what onnxruntime's quantizer chose: per channel
    or per tensor, 7- or 8-bit). Only symmetric grids along the output channel; others are left out."""
    from onnx import numpy_helper

    from edgeexport.onnxgraph import output_axis

    inits = {t.name: t for t in qdq_model.graph.initializer}
    deq = {n.output[0]: n for n in qdq_model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    out = {}
    for n in qdq_model.graph.node:
        d = deq.get(n.input[1]) if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 else None
        if d is None or len(d.input) < 2 or d.input[1] not in inits:
            continue
        q = numpy_helper.to_array(inits[d.input[0]])
        scale = numpy_helper.to_array(inits[d.input[1]]).astype(np.float64).reshape(-1)
        zp = numpy_helper.to_array(inits[d.input[2]]) if len(d.input) > 2 and d.input[2] in inits else np.zeros(1)
        if np.any(zp != 0) or q.dtype.kind != "i" or not _eligible(n, q):
            continue
        rows = q.shape[output_axis(n)]
        if scale.size == 1:
            scale = np.full(rows, scale[0])
        elif scale.size != rows or _attr(d, "axis", 1) % q.ndim != output_axis(n) % q.ndim:
            continue
        out[n.name] = Grid(np.where(scale > 0, scale, 1.0), int(np.abs(q.astype(np.int64)).max()))
    return out


def _patches(x: np.ndarray, node: Any, kernel: tuple[int, ...]) -> np.ndarray:
    """im2col of one sample ``x`` [C, *spatial] for a Conv: [groups, cin/group * prod(kernel), positions]."""
    from numpy.lib.stride_tricks import sliding_window_view

    if len(kernel) == 1:  # a 1-D conv as a 2-D one of height 1
        x, kernel = x[:, None, :], (1, kernel[0])
        pads = [0, _attr(node, "pads", [0, 0])[0], 0, _attr(node, "pads", [0, 0])[1]]
        strides, dil = [1, _attr(node, "strides", [1])[0]], [1, _attr(node, "dilations", [1])[0]]
    else:
        pads = list(_attr(node, "pads", [0, 0, 0, 0]))
        strides, dil = list(_attr(node, "strides", [1, 1])), list(_attr(node, "dilations", [1, 1]))
    g = _attr(node, "group", 1)
    c = x.shape[0]
    if kernel == (1, 1) and strides == [1, 1] and not any(pads):
        return x.reshape(g, c // g, -1)
    xp = np.pad(x, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = ((kernel[0] - 1) * dil[0] + 1, (kernel[1] - 1) * dil[1] + 1)
    win = sliding_window_view(xp, span, axis=(1, 2))[:, ::strides[0], ::strides[1], ::dil[0], ::dil[1]]
    positions = win.shape[1] * win.shape[2]
    win = win.reshape(g, c // g, positions, kernel[0] * kernel[1]).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(win).reshape(g, (c // g) * kernel[0] * kernel[1], positions)


def hessians(model_path: Path, nodes: list[Any], weights: dict[str, np.ndarray],
             feeds: Iterable[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], int]:
    """``E[x x^T]`` (summed, [groups, d, d]) of each node's inputs over ``feeds``, and how many feeds there were."""
    import onnx

    from edgeexport.onnxgraph import exposing_session
    from edgeexport.util import progress

    names = sorted({n.input[0] for n in nodes})
    sess, outs = exposing_session(onnx.load(str(model_path)), names)
    wanted = set(names)
    hs: dict[str, np.ndarray] = {}
    count = 0
    total = len(feeds) if isinstance(feeds, Sized) else None
    for feed in progress(feeds, f"GPTQ: input statistics of {len(nodes)} layers", total=total):
        values = {k: v for k, v in zip(outs, sess.run(outs, {i.name: feed[i.name] for i in sess.get_inputs()}))
                  if k in wanted}
        for n in nodes:
            x = np.asarray(values[n.input[0]], dtype=np.float32)
            if n.op_type == "Conv":
                kernel = tuple(weights[n.name].shape[2:])
                h = sum(np.matmul(p, p.transpose(0, 2, 1)).astype(np.float64)
                        for p in (_patches(sample, n, kernel) for sample in x))
            else:
                x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
                h = (x2.T @ x2)[None]
            hs[n.name] = hs[n.name] + h if n.name in hs else h
        count += 1
    return hs, count


def round_rows(w: np.ndarray, h: np.ndarray, scale: np.ndarray, qmax: int, damp: float = DAMP) -> np.ndarray:
    """GPTQ of ``w`` [rows, d] on the grid ``scale`` [rows] x [-qmax, qmax], with input second moments ``h``
    [d, d]. Returns the rounded weights (grid values, in float). Each row's largest weight is kept as it is, so a
    quantizer that derives the scale from max |w| finds the same grid."""
    w = np.array(w, dtype=np.float64)
    rows, d = w.shape
    s = np.asarray(scale, dtype=np.float64)
    keep = np.zeros(w.shape, dtype=bool)
    keep[np.arange(rows), np.abs(w).argmax(axis=1)] = True
    h = np.array(h, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    mean_diag = float(np.mean(np.diag(h)))
    for attempt in range(3):
        try:
            u = np.linalg.cholesky(np.linalg.inv(h + damp * 10 ** attempt * mean_diag * np.eye(d))).T  # H^-1 = U^T U
            break
        except np.linalg.LinAlgError:
            continue
    else:  # H too ill-conditioned even when damped: nearest rounding
        return np.clip(np.round(w / s[:, None]), -qmax, qmax) * s[:, None]
    q = np.empty_like(w)
    for b0 in range(0, d, BLOCK):
        b1 = min(b0 + BLOCK, d)
        err = np.zeros((rows, b1 - b0))
        for i in range(b0, b1):
            q[:, i] = np.clip(np.round(w[:, i] / s), -qmax, qmax) * s
            err[:, i - b0] = (w[:, i] - q[:, i]) / u[i, i]
            if i + 1 < b1:
                w[:, i + 1:b1] -= np.where(keep[:, i + 1:b1], 0.0, np.outer(err[:, i - b0], u[i, i + 1:b1]))
        if b1 < d:
            w[:, b1:] -= np.where(keep[:, b1:], 0.0, err @ u[b0:b1, b1:])
    return q


def round_weights(model_path: Path, grids: dict[str, Grid], feeds: Iterable[dict[str, np.ndarray]]
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """GPTQ-rounded weights (node name -> weight on its grid, in the weight's own layout) for each node of
    ``grids`` whose weight is a constant it alone uses, and the manifest's record of it."""
    import onnx
    from onnx import numpy_helper

    from edgeexport.util import progress

    model = onnx.load(str(model_path))
    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    nodes, weights, too_wide = [], {}, 0
    for n in model.graph.node:
        if (n.name in grids and len(n.input) > 1 and n.input[1] in inits and users.get(n.input[1]) == 1
                and n.input[0] not in inits):
            w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
            if _eligible(n, w) and grids[n.name].scale.shape == (_rows(n, w).shape[0],):
                if _rows(n, w).shape[1] > MAX_COLUMNS:  # inputs per output channel (per group for a Conv)
                    too_wide += 1
                    continue
                nodes.append(n)
                weights[n.name] = w
    if not nodes:
        return {}, {"weight_rounding": "nearest (no layer GPTQ can round)"}
    feeds = list(feeds)
    key = _fingerprint(model_path, feeds)
    hs: dict[str, np.ndarray] = dict(_CACHE.get(key, {}))
    samples = len(feeds)
    try:
        for batch in _passes([n for n in nodes if n.name not in hs], weights):
            got, samples = hessians(model_path, batch, weights, feeds)
            hs.update(got)
    except Exception as e:  # inputs that cannot be measured: the quantizer's nearest rounding stands, and says so
        return {}, {"weight_rounding": f"nearest (GPTQ could not measure the layers' inputs: {type(e).__name__}: "
                                       f"{str(e)[:160]})"}
    out = {}
    for n in progress(nodes, "GPTQ: rounding", total=len(nodes)):
        w, grid, h = weights[n.name], grids[n.name], hs[n.name]
        rows = _rows(n, w)
        groups = h.shape[0]
        per = rows.shape[0] // groups
        q = np.concatenate([round_rows(rows[k * per:(k + 1) * per], h[k], grid.scale[k * per:(k + 1) * per],
                                       grid.qmax) for k in range(groups)])
        out[n.name] = _unrows(n, q, w.shape)
    _CACHE.clear()
    _CACHE[key] = hs
    info = {"weight_rounding": "gptq", "gptq_layers": len(out), "gptq_samples": samples, "gptq_damp": DAMP}
    if too_wide:
        info["gptq_skipped_wide_layers"] = too_wide
    return out, info


#: the H matrices of the last graph and samples measured: the trial builds of an --accuracy-budget search or of a
#: refusal's diagnosis change only what is quantized, never the float graph H is measured on
_CACHE: dict[str, dict[str, np.ndarray]] = {}


def _fingerprint(model_path: Path, feeds: list[dict[str, np.ndarray]]) -> str:
    import hashlib

    h = hashlib.sha256(Path(model_path).read_bytes())
    for feed in feeds:
        for name in sorted(feed):
            h.update(name.encode())
            h.update(np.ascontiguousarray(feed[name]).tobytes())
    return h.hexdigest()


def _h_bytes(node: Any, w: np.ndarray) -> int:
    """Bytes of the node's H matrices: groups x d x d float64, d its inputs per group."""
    groups = _attr(node, "group", 1) if node.op_type == "Conv" else 1
    d = _rows(node, w).shape[1]
    return groups * d * d * 8


def _passes(nodes: list[Any], weights: dict[str, np.ndarray]) -> list[list[Any]]:
    """``nodes`` in order, cut into runs whose H matrices fit PASS_BYTES together (one node at least per run)."""
    runs: list[list[Any]] = [[]]
    used = 0
    for n in nodes:
        size = _h_bytes(n, weights[n.name])
        if runs[-1] and used + size > PASS_BYTES:
            runs.append([])
            used = 0
        runs[-1].append(n)
        used += size
    return [r for r in runs if r]


def write_weights(src: Path, dst: Path, weights: dict[str, np.ndarray]) -> None:
    """``src`` with the named nodes' constant weights replaced by ``weights``, saved as ``dst``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.name in weights:
            t = inits[n.input[1]]
            t.CopyFrom(numpy_helper.from_array(weights[n.name].astype(np.float32), t.name))
    onnx.save(model, str(dst))
