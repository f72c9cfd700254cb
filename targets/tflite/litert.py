"""The second TFLite converter: PyTorch -> torch.export -> .tflite through litert-torch (Google's supported path),
with ai-edge-quantizer for the weight precisions. Build time only (the bundle's loader runs the file like any
other .tflite).

Used where onnx2tf cannot convert the ONNX graph (``--option converter=auto``, e.g. onnx2tf 1.28.8 on
all-MiniLM-L6-v2's first feed-forward Add), or when asked for (``converter=litert-torch``). What it does:

- fp32: ``litert_torch.convert`` on the model as the user gave it (the source's ``torch_module``);
- fp16: float16 weights (ai-edge-quantizer's float casting), float32 compute;
- dynamic-range: int8 weights per channel, float activations, int8 kernels where TFLite has them
  (ai-edge-quantizer's ``dynamic_wi8_afp32``);
- int8 (full-integer): refused. ai-edge-quantizer's ``static_wi8_ai8`` on all-MiniLM-L6-v2 kept float tensors and
  gave a sentence-embedding cosine of 0.63 to the fp32 file (a probe here, calibrated on 16 random-token
  inputs); litert-torch's PT2E path is what Google documents for it and was measured at 0.9465 in an earlier
  probe. Neither passes the gate.

The .tflite it writes takes its inputs as ``args_0..`` and returns ``output_0..`` with int64 inputs narrowed to
int32; the manifest maps the model's names onto them (``runtime_config.signature``) and the loader casts.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from edgeexport.errors import TargetError
from edgeexport.util import heartbeat, quiet

if TYPE_CHECKING:  # pragma: no cover
    from edgeexport.calibration import CalibrationSet
    from edgeexport.config import InputSpec

#: what the litert-torch path does not build (it builds fp32, fp16 and dynamic-range), and why
REFUSED = {"int8": "full-integer int8 is not built through litert-torch: ai-edge-quantizer's static_wi8_ai8 kept "
                   "float tensors and gave a sentence-embedding cosine of 0.63 on all-MiniLM-L6-v2 in a probe here"}
INSTALL = "pip install --no-deps -c constraints.txt -r requirements-litert.txt (in the edgeexport checkout)"


def version() -> Optional[str]:
    """litert-torch's version, or None when it is not installed."""
    try:
        return importlib.metadata.version("litert-torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def unavailable(precision: str, module: Any) -> Optional[str]:
    """Why the litert-torch path cannot build this (None: it can)."""
    if precision in REFUSED:
        return REFUSED[precision]
    if module is None:
        return "litert-torch starts from PyTorch and the model was given as ONNX"
    if version() is None:
        return f"litert-torch is not installed ({INSTALL})"
    return None


def convert(module: Any, specs: list["InputSpec"], output_names: list[str], calibration: "CalibrationSet",
            precision: str, out_file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write ``out_file`` from ``module``; return the settings for the manifest and the file's I/O for the runtime
    config (``signature``: model names -> the file's names, ``native_inputs``/``native_outputs``, and ``narrowed``:
    the inputs the file takes in a narrower integer type)."""
    with quiet():
        import litert_torch
        import torch
    feed = next(iter(calibration.calibration()))
    args = tuple(torch.from_numpy(np.ascontiguousarray(feed[s.name])) for s in specs)
    float_file = out_file.with_name(out_file.stem + "_float.tflite") if precision != "fp32" else out_file
    with heartbeat(_say, "converting with litert-torch"), quiet() as log:
        try:
            with torch.inference_mode(False), torch.no_grad():
                edge = litert_torch.convert(module, args)
            edge.export(str(float_file))
        except Exception as e:
            text = " ".join(f"{type(e).__name__}: {e}".split())[:400]
            raise TargetError("litert-torch could not convert the model", text + _tail(log.getvalue()),
                              "litert-torch needs a model torch.export can trace (no TorchScript, no data-dependent "
                              "Python control flow); try --option converter=onnx2tf, or --target ort") from None
    settings: dict[str, Any] = {"converter": f"litert-torch {version()} (torch.export -> .tflite)"}
    if precision != "fp32":
        settings["quantizer"] = f"ai-edge-quantizer {importlib.metadata.version('ai-edge-quantizer')}"
        settings["recipe"] = _quantize(float_file, out_file, precision)
        float_file.unlink()
    return settings, _io(out_file, specs, output_names)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _tail(log: str) -> str:
    lines = [ln for ln in log.strip().splitlines() if ln.strip()]
    return f" | {lines[-1][:200]}" if lines else ""


def _quantize(float_file: Path, out_file: Path, precision: str) -> str:
    with quiet():
        from ai_edge_quantizer import quantizer, recipe
        from ai_edge_quantizer.qtyping import TFLOperationName
        from ai_edge_quantizer.recipe import AlgorithmName
    if precision == "dynamic-range":
        name, rp = "dynamic_wi8_afp32 (int8 weights per channel, float activations)", recipe.dynamic_wi8_afp32()
        q = quantizer.Quantizer(str(float_file), rp)
    else:  # fp16
        name = ("float16 weights (float casting of FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D, CONV_2D_TRANSPOSE "
                "and EMBEDDING_LOOKUP weights), float32 compute")
        q = quantizer.Quantizer(str(float_file))
        for op in (TFLOperationName.FULLY_CONNECTED, TFLOperationName.CONV_2D, TFLOperationName.DEPTHWISE_CONV_2D,
                   TFLOperationName.CONV_2D_TRANSPOSE, TFLOperationName.EMBEDDING_LOOKUP):
            q.add_weight_only_config(regex=".*", operation_name=op, num_bits=16,
                                     algorithm_key=AlgorithmName.FLOAT_CASTING)
    with quiet() as log:
        try:
            result = q.quantize(enable_progress_bar=False, enable_progress_report=False)
        except Exception as e:
            raise TargetError(f"ai-edge-quantizer could not make the {precision} file",
                              " ".join(f"{type(e).__name__}: {e}".split())[:400] + _tail(log.getvalue()),
                              "use --precision fp32, or --option converter=onnx2tf") from None
    out_file.write_bytes(bytes(result.quantized_model))
    return name


def _io(path: Path, specs: list["InputSpec"], output_names: list[str]) -> dict[str, Any]:
    """litert-torch names the file's inputs args_0.. (positional order) and outputs output_0.. (tuple order). The
    native I/O keeps the model's dtypes: the loader casts to the file's (int64 ids narrowed to int32)."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner()
    ins, outs = runner.get_input_details(), runner.get_output_details()
    want_in, want_out = [f"args_{i}" for i in range(len(specs))], [f"output_{i}" for i in range(len(output_names))]
    if sorted(ins) != sorted(want_in) or sorted(outs) != sorted(want_out):
        raise TargetError("the litert-torch file's signature is not the model's",
                          f"inputs {list(ins)} / outputs {list(outs)}, expected {want_in} / {want_out}",
                          "use --option converter=onnx2tf, or --target ort")
    file_in = {s.name: ins[key] for s, key in zip(specs, want_in)}
    return {"signature": {"inputs": dict(zip([s.name for s in specs], want_in)),
                          "outputs": dict(zip(output_names, want_out))},
            # a scalar input becomes [1] in the file; the loader reshapes, so it is still fed as a scalar
            "native_inputs": [{"name": s.name, "dtype": s.dtype,
                               "shape": [] if not s.shape else [int(d) for d in file_in[s.name]["shape"]]}
                              for s in specs],
            "native_outputs": [{"name": n, "shape": [int(d) for d in outs[key]["shape"]], "dtype": "float32"}
                               for n, key in zip(output_names, want_out)],
            "narrowed": {s.name: np.dtype(file_in[s.name]["dtype"]).name for s in specs
                         if np.dtype(file_in[s.name]["dtype"]).name != s.dtype}}
