"""Transformer fusion of an exported ONNX graph for onnxruntime: EmbedLayerNormalization, Attention,
(Skip)LayerNormalization and BiasGelu from onnxruntime.transformers' BERT optimizer. Off by default: measured
on x86 CPUs it buys nothing (see NOT_BY_DEFAULT); GPU providers run the fused Attention with their own kernels.

torch 2.13's exporter writes attention as MatMul / Softmax / Transpose chains with their shape arithmetic
(Shape, Gather, Concat) left in the graph. onnxruntime fuses LayerNormalization and Gelu when a session loads,
but not attention: the BERT optimizer does, once onnxruntime's basic optimizations (constant folding) have
removed the shape arithmetic (``opt_level=1``). The fused ops are com.microsoft contrib ops of onnxruntime's CPU
provider (onnxruntime >= 1.10 has each); a reduced ORT Mobile build must include them.

A graph the optimizer does not recognise is left as exported, with the reason: never a failed build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeexport.util import quiet

#: --option fusion: auto (bert for graphs whose Softmax reads an activation x activation MatMul), bert, none
CHOICES = ("auto", "bert", "none")
#: why fusion is off unless asked for (measured with benchmarks/minilm.py and interleaved A/B runs, 2 threads)
NOT_BY_DEFAULT = ("off unless --option fusion=auto|bert: on x86 CPUs the fused graph was no faster (all-MiniLM-L6-v2, "
                  "seq 128: fp32 11.6 vs 11.2 ms unfused, int8-dynamic 6.0 vs 6.0 ms), since onnxruntime fuses "
                  "LayerNorm, Gelu and MatMul+Add itself when it loads a model; the contrib ops are for GPU providers")
#: the fused ops counted in the manifest
FUSED_OPS = ("EmbedLayerNormalization", "Attention", "MultiHeadAttention", "SkipLayerNormalization",
             "LayerNormalization", "BiasGelu", "FastGelu", "Gelu")


def fuse(src: Path, dst: Path, choice: str) -> dict[str, Any]:
    """Fuse ``src`` into ``dst`` when ``choice`` asks for it (auto: for transformer graphs) and the optimizer finds
    attention; returns the manifest's record. ``dst`` is written only when something was fused."""
    import onnx

    if choice == "none":
        return {"fusion": "none", "fusion_requested": choice, "fusion_reason": NOT_BY_DEFAULT}
    if choice == "auto":
        from edgeexport.recipes import family

        if family(onnx.load(str(src))) != "transformer":
            return {"fusion": "none", "fusion_requested": choice, "fusion_reason": "not a transformer graph"}
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        with quiet():
            optimized = optimize_model(str(src), model_type="bert", num_heads=0, hidden_size=0, opt_level=1,
                                       use_gpu=False)
        counts = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v and k in FUSED_OPS}
    except Exception as e:  # an optimizer failure keeps the exported graph
        return {"fusion": "none", "fusion_requested": choice,
                "fusion_reason": f"the BERT optimizer failed ({type(e).__name__}: {str(e)[:200]}); exported unfused"}
    if not counts.get("Attention") and not counts.get("MultiHeadAttention"):
        return {"fusion": "none", "fusion_requested": choice, "fused_ops": counts,
                "fusion_reason": "the BERT optimizer found no attention pattern it knows; exported unfused"}
    model = optimized.model
    onnx.save(model, str(dst))
    contrib = sorted({n.op_type for n in model.graph.node if n.domain == "com.microsoft"})
    return {"fusion": "bert", "fusion_requested": choice, "fused_ops": counts, "contrib_ops": contrib,
            "fusion_by": "onnxruntime.transformers.optimizer (model_type=bert, opt_level=1)"}
