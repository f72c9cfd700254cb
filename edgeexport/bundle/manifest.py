"""The manifest: everything known about a bundle, as JSON with a schema version.

The loader (``loader.py``, shipped in the bundle) reads and checks it on the device; this module builds it.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
from typing import Any, Optional

SCHEMA_VERSION = 1

PRECISION_LABELS = {
    "fp32": "fp32 (float32 weights and activations)",
    "fp16": "fp16 (float16 weights and compute, float32 inputs/outputs)",
    "int8-dynamic": "int8 dynamic (int8 weights; activations quantized at run time)",
    "int8": "int8 static (int8 weights and calibrated 8-bit activations, QDQ)",
    "dynamic-range": "dynamic-range (int8 weights, float activations)",
    "int8-weight": "int8 weight-only (8-bit weight blocks, float activations between layers)",
    "int4-weight": "int4 weight-only (4-bit weight blocks; output layer 8-bit; float activations between layers)",
}
# a target words a precision its own way where its format differs (Target.precision_labels)

# Golden-pair tolerance for the on-device self-test, per precision: fraction of each output's max magnitude
# allowed as absolute error, and the minimum cosine similarity. The golden outputs come from the built model
# itself, so only runtime/CPU differences need to fit (quantized kernels differ most across CPUs).
GOLDEN_TOLERANCE = {
    "fp32": (1e-4, 0.99999),
    "fp16": (5e-3, 0.9999),
    "int8-dynamic": (5e-2, 0.995),
    "dynamic-range": (5e-2, 0.995),
    "int8": (5e-2, 0.995),
    "int8-weight": (5e-2, 0.995),
    "int4-weight": (1e-1, 0.99),
}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("edgeexport", "torch", "onnx", "onnxruntime", "onnxscript", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def golden_tolerance(precision: str, golden_outputs: list[dict[str, Any]],
                     override: Optional[tuple[float, float]] = None) -> dict[str, Any]:
    import numpy as np

    frac, min_cos = override or GOLDEN_TOLERANCE.get(precision, (5e-2, 0.995))
    atol: dict[str, float] = {}
    for outs in golden_outputs:
        for name, arr in outs.items():
            scale = float(np.max(np.abs(arr))) if np.size(arr) else 0.0
            atol[name] = max(atol.get(name, 0.0), max(frac * scale, 1e-6))
    return {"atol": atol, "min_cosine": min_cos}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
