"""Count a model's floating-point work from its ONNX graph, and measure the machine's matmul peak to compare with.

FLOPs are 2 x the multiply-adds of Conv, ConvTranspose, MatMul and Gemm, of the recurrent layers' input and
recurrent matrix products (LSTM, GRU, RNN: every time step, every direction, every gate), and of fused attention
(ONNX Attention, onnxruntime's Attention and MultiHeadAttention: Q.K^T and the weighted sum of V), the ops that dominate
the work of CNNs, transformers and recurrent models; elementwise ops, gate nonlinearities, norms and softmax are not
counted. Shapes come from running the float graph once on a real input with onnxruntime, so dynamic dims (batch,
sequence) take the values of that input.
"""

from __future__ import annotations

import time
from math import prod
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from edgeexport.onnxgraph import attr as _attr

COUNTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
#: ONNX's recurrent layers: inputs X, W [directions, gates x hidden, input], R [directions, gates x hidden, hidden]
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
#: fused attention: ONNX's Attention (opset 23: Q, K, V in) and onnxruntime's com.microsoft MultiHeadAttention
#: (Q, K, V projected) and Attention (the input and the packed QKV weights: the projection is counted too)
ATTENTION_OPS = ("Attention", "MultiHeadAttention")


def _node_flops(node: Any, shape: dict[str, list[int]]) -> int:
    ins = [shape.get(n) for n in node.input]
    out = shape.get(node.output[0])
    if node.op_type in RECURRENT_OPS:
        x, w, r = (ins + [None, None, None])[:3]
        if not x or not w or not r:
            return 0
        steps_x_batch = x[0] * x[1]  # seq x batch (or batch x seq with layout=1): the same product
        return 2 * steps_x_batch * w[0] * w[1] * (w[2] + r[2])  # directions x (gates x hidden) x (input + hidden)
    if node.op_type in ATTENTION_OPS:
        return _attention_flops(node, ins, out)
    if node.op_type == "MatMul":
        a, b = ins[0], ins[1]
        if a is None or b is None or out is None:
            return 0
        k = a[-1] if len(a) >= 1 else 1
        return 2 * prod(out) * k  # each output element is a K-long dot product
    if node.op_type == "Gemm":
        a = ins[0]
        if a is None or out is None:
            return 0
        k = a[0] if _attr(node, "transA", 0) else a[-1]
        return 2 * prod(out) * k
    if node.op_type == "Conv":
        w = ins[1]
        if w is None or out is None:
            return 0
        return 2 * prod(out) * prod(w[1:])  # out elements x (Cin/group x kernel)
    if node.op_type == "ConvTranspose":
        x, w = ins[0], ins[1]
        if x is None or w is None:
            return 0
        return 2 * prod(x) * prod(w[1:])  # every input element scatters into (Cout/group x kernel) outputs
    return 0


def _attention_flops(node: Any, ins: list, out: Optional[list[int]]) -> int:
    """Q.K^T and weights.V: every query element meets every key (2 x Skv x |Q|), every output element sums Skv
    values (2 x Skv x |out|); com.microsoft's Attention also projects its input to Q, K and V."""
    q, second = (ins + [None, None])[:2]
    if q is None or second is None or out is None:
        return 0
    if node.domain == "com.microsoft" and node.op_type == "Attention":  # input [B, S, in], weights [in, 3 x hidden]
        seq, hidden = q[1], second[1] // 3
        return 2 * prod(q) * second[1] + 2 * seq * (prod(q[:2]) * hidden + prod(out))
    kv_len = second[2] if len(second) == 4 else second[1]  # K as [B, heads, Skv, D] or [B, Skv, hidden]
    return 2 * kv_len * (prod(q) + prod(out))


def tensor_shapes(model: Any, nodes: list[Any], feed: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
    """Shapes of the data/weight inputs and the output of ``nodes`` on one run of ``model`` (a ModelProto,
    extended in place) on ``feed``, plus every initializer's."""
    from edgeexport.onnxgraph import exposing_session

    shape: dict[str, list[int]] = {i.name: list(i.dims) for i in model.graph.initializer}
    wanted = {name for n in nodes for name in (*n.input[:3 if n.op_type in RECURRENT_OPS else 2], n.output[0])
              if name and name not in shape}
    sess, names = exposing_session(model, sorted(wanted))
    for name, value in zip(names, sess.run(names, {i.name: feed[i.name] for i in sess.get_inputs()})):
        shape[name] = list(np.shape(value))
    return shape


def count_flops(onnx_path: Path, feed: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """FLOPs of one run of the float ONNX model on ``feed``, per op type, plus its parameter count."""
    import onnx

    model = onnx.load(str(onnx_path))
    graph = model.graph
    counted = [n for n in graph.node if n.op_type in COUNTED_OPS + RECURRENT_OPS + ATTENTION_OPS]
    shape = tensor_shapes(model, counted, feed)
    by_op: dict[str, int] = {}
    for node in counted:
        by_op[node.op_type] = by_op.get(node.op_type, 0) + _node_flops(node, shape)
    params = sum(prod(i.dims) for i in graph.initializer if i.data_type in (1, 10, 11, 16))  # float types
    return {"flops": int(sum(by_op.values())), "by_op": by_op, "params": int(params),
            "feed_shapes": {k: list(np.shape(v)) for k, v in feed.items()},
            "counted": "2 x multiply-adds of " + ", ".join(COUNTED_OPS + RECURRENT_OPS + ATTENTION_OPS),
            # not counted: their shapes are not known outside the branch taken at run time
            "uncounted_in_subgraphs": subgraph_weighted_ops(model)}


def subgraph_weighted_ops(model: Any) -> dict[str, int]:
    """Weighted nodes (Conv, MatMul, ..., LSTM) inside control-flow subgraphs (If branches, Loop and Scan bodies),
    by op type: work that graph-level quantizers (ONNX Runtime's included) never rewrite."""
    from collections import Counter

    found: Counter[str] = Counter()

    def walk(graph: Any, nested: bool) -> None:
        for n in graph.node:
            if nested and n.op_type in COUNTED_OPS + RECURRENT_OPS:
                found[n.op_type] += 1
            for a in n.attribute:
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    walk(g, True)
    walk(model.graph, False)
    return dict(found)


def matmul_peak(threads: Optional[int] = None, n: int = 1024, seconds: float = 1.0) -> dict[str, Any]:
    """The best float32 GEMM rate this machine reaches here (numpy's BLAS and torch, whichever is faster)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flop = 2.0 * n ** 3

    def best(fn) -> float:
        fn()
        times: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 3:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return flop / min(times) / 1e9

    results = {"numpy": best(lambda: a @ b)}
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        results["torch"] = best(lambda: torch.mm(ta, tb))
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
    lib = max(results, key=lambda k: results[k])
    return {"gflops_per_s": results[lib], "by_library": results, "best": lib, "n": n, "dtype": "float32",
            "threads": threads}
