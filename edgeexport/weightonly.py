"""Weight-only int4/int8 quantization for decoders: onnxruntime's ``MatMulNBits`` (weights in blocks of
``block_size`` along the input dimension, one float scale per block; activations stay float), and
``GatherBlockQuantized`` for the token-embedding table at 4 bits.

A decoder's decode step reads every weight once per token, so its speed is bounded by weight bytes; halving or
quartering them is what makes generation faster on a CPU or a phone, and the per-block scale keeps the error small
(measured on the trained decoder in benchmarks/decoder.py).

Exporters write a linear layer either as MatMul (+ Add) or as Gemm (GPT-2's Conv1D modules become Gemm): the
quantizer only rewrites MatMul, so each Gemm with a constant 2-D weight is first split into the equivalent
MatMul + Add, exactly (same arithmetic in float).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

BLOCK_SIZES = (16, 32, 64, 128, 256)


def gemm_to_matmul(model: Any) -> int:
    """Rewrite in place each Gemm (alpha 1, transA 0, constant 2-D weight) as MatMul (+ Add of its bias; beta
    folded into the bias). Returns how many were rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    attrs = lambda n: {a.name: helper.get_attribute_value(a) for a in n.attribute}  # noqa: E731
    new_nodes, rewritten = [], 0
    for n in graph.node:
        a = attrs(n) if n.op_type == "Gemm" else {}
        if (n.op_type != "Gemm" or a.get("transA", 0) or float(a.get("alpha", 1.0)) != 1.0 or len(n.input) < 2
                or n.input[1] not in inits or len(inits[n.input[1]].dims) != 2):
            new_nodes.append(n)
            continue
        w_name = n.input[1]
        if a.get("transB", 0):
            w = numpy_helper.to_array(inits[w_name]).T.copy()
            w_name = f"{n.input[1]}_transposed" if uses.get(n.input[1], 0) > 1 else n.input[1]
            tensor = numpy_helper.from_array(w, w_name)
            if w_name in inits:
                inits[w_name].CopyFrom(tensor)
            else:
                graph.initializer.append(tensor)
                inits[w_name] = graph.initializer[-1]
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else ""
        beta = float(a.get("beta", 1.0))
        if bias and beta != 1.0:
            if bias not in inits:
                new_nodes.append(n)  # a computed bias scaled by beta: leave that Gemm alone
                continue
            scaled = numpy_helper.to_array(inits[bias]) * np.float32(beta)
            bias = f"{bias}_beta"
            graph.initializer.append(numpy_helper.from_array(scaled.astype(np.float32), bias))
        name = n.name or f"gemm_{rewritten}"
        out = n.output[0]
        if bias:
            mid = f"{out}_matmul"
            new_nodes.append(helper.make_node("MatMul", [n.input[0], w_name], [mid], name=f"{name}_MatMul"))
            new_nodes.append(helper.make_node("Add", [mid, bias], [out], name=f"{name}_Add"))
        else:
            new_nodes.append(helper.make_node("MatMul", [n.input[0], w_name], [out], name=f"{name}_MatMul"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.checker.check_model(model)
    return rewritten


#: MatMulNBits' accuracy_level 4: the kernel quantizes each block of activations to int8 at run time and
#: multiplies in integers (onnxruntime's CPU default for int4 models); 0 keeps float32 activations. On the trained
#: decoder level 4 decoded 1.5-3x faster than level 0 at the same perplexity (benchmarks/decoder.py)
ACCURACY_LEVEL = 4


def output_layers(model: Any) -> list[str]:
    """Names of the constant-weight MatMuls whose result is a graph output (directly or through one Add): a
    language model's lm_head, a classifier's last layer."""
    consts = {t.name for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    adds = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "Add"}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in consts
            and (n.output[0] in outputs or adds.get(n.output[0]) in outputs)]


def matmul_weight_share(model: Any) -> float:
    """The share of the weighted layers' parameters (MatMul/Gemm, Conv/ConvTranspose, LSTM/GRU/RNN constants) held
    by MatMul and Gemm, the layers weight-only quantization covers. 1.0 for a graph with no weighted layer."""
    inits = {t.name: t for t in model.graph.initializer}
    size = lambda name: int(np.prod(inits[name].dims)) if name in inits else 0  # noqa: E731
    covered = other = 0
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1:
            covered += size(n.input[1])
        elif n.op_type in ("Conv", "ConvTranspose", "LSTM", "GRU", "RNN"):
            other += sum(size(i) for i in n.input[1:3])
    return covered / (covered + other) if covered + other else 1.0


def token_table(model: Any) -> str | None:
    """The Gather reading the largest constant 2-D table (a language model's token embeddings), if any. Smaller
    tables (learned positions, token types) are left alone: they are small and every token reads them."""
    inits = {t.name: t for t in model.graph.initializer}
    tables = [(int(inits[n.input[0]].dims[0]), n.name) for n in model.graph.node
              if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]
    return max(tables)[1] if tables else None


def _nbits(model: Any, bits: int, block_size: int, symmetric: bool, accuracy_level: int, ops: tuple[str, ...],
           exclude: list[str]) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from edgeexport.util import quiet

    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits,
                                       accuracy_level=accuracy_level or None, op_types_to_quantize=ops)
    with quiet():
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                         accuracy_level=accuracy_level or None, nodes_to_exclude=exclude,
                                         algo_config=cfg)
        quantizer.process()
    return quantizer.model.model


def quantize_weight_only(src: Path, dst: Path, bits: int, block_size: int = 32, symmetric: bool = True,
                         accuracy_level: int = ACCURACY_LEVEL, output_bits: int | None = 8,
                         embeddings: bool = False) -> dict[str, Any]:
    """Write ``src`` with its constant-weight MatMuls as MatMulNBits with ``bits`` (4 or 8) in blocks of
    ``block_size``; the layers producing graph outputs (lm_head) with ``output_bits`` (default 8; None: ``bits``);
    with ``embeddings`` (4 bits only: onnxruntime's GatherBlockQuantized has no 8-bit form) the token-embedding
    table as 4-bit GatherBlockQuantized. Returns the manifest's record: what was quantized at which width, the
    block size, the compute precision, and how many MatMuls with constant weights stayed float.

    The defaults follow what the trained decoder measured at 4 bits (block 32; benchmarks/decoder.py and
    docs/decoders.md): everything at 4 bits gave a decisive next-token agreement of 0.976 and KL 0.0093; the lm_head
    at 8 bits, 0.985 and 0.0055 with a 4-bit token table, 0.9985 and 0.0015 with a float one. The token table costs
    no decode speed (a token reads one row of it), only file size."""
    import onnx

    if bits not in (4, 8) or (output_bits is not None and output_bits not in (4, 8)):
        raise ValueError(f"weight-only quantization has 4 or 8 bits, not {bits if bits not in (4, 8) else output_bits}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, not {block_size}")
    head_bits = output_bits or bits
    model = onnx.load(str(src))
    share = matmul_weight_share(model)
    split = gemm_to_matmul(model)
    heads = output_layers(model)
    table = token_table(model) if embeddings and bits == 4 else None
    if head_bits != bits and heads:  # the output layers first, alone, at their own width
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in heads]
        model = _nbits(model, head_bits, block_size, symmetric, accuracy_level, ("MatMul",), others)
    gathers = [n.name for n in model.graph.node if n.op_type == "Gather" and n.name != table]
    out = _nbits(model, bits, block_size, symmetric, accuracy_level, ("MatMul", "Gather") if table else ("MatMul",),
                 gathers)
    onnx.save(out, str(dst))
    counts: dict[str, int] = {}
    widths: dict[int, int] = {}
    for n in out.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
        if n.op_type == "MatMulNBits":
            w = next((a.i for a in n.attribute if a.name == "bits"), 4)
            widths[w] = widths.get(w, 0) + 1
    consts = {t.name for t in out.graph.initializer}
    float_matmuls = sum(1 for n in out.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in consts)
    return {"quantization": "weight-only", "quantizer": "onnxruntime MatMulNBitsQuantizer", "weight_bits": bits,
            "output_layer_bits": head_bits if heads else None, "output_layers": heads,
            "block_size": block_size, "symmetric": symmetric, "accuracy_level": accuracy_level,
            "quantized_matmuls": counts.get("MatMulNBits", 0),
            "matmuls_by_bits": {str(k): v for k, v in sorted(widths.items())},
            "quantized_embeddings": counts.get("GatherBlockQuantized", 0),
            "embeddings": "4-bit token table" if counts.get("GatherBlockQuantized") else "float",
            "float_weight_matmuls": float_matmuls, "gemms_split": split, "covered_weight_share": share,
            "activations": ("float32 between layers; quantized to int8 per block inside MatMulNBits (accuracy_level 4)"
                            if accuracy_level == 4 else "float32")}
