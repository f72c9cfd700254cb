"""The PyTorch reference Runner: the user's model in eager mode, the ground truth for validation."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from edgeexport.errors import TargetError
from edgeexport.runner import Runner, TensorInfo, ort_io


def flatten_outputs(out: Any, names: list[str] | None = None) -> list[Any]:
    """Tensor | tuple/list | dict (e.g. Hugging Face ModelOutput) -> flat list of tensors, in a stable order."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "items") and hasattr(out, "keys"):
        return [v for v in out.values() if isinstance(v, torch.Tensor)]
    if isinstance(out, (list, tuple)):
        flat: list[Any] = []
        for o in out:
            flat.extend(flatten_outputs(o))
        return flat
    from edgeexport.errors import ModelLoadError

    raise ModelLoadError(f"the model's forward returned {type(out).__name__}, which is not a tensor",
                         "edgeexport exports and validates tensor outputs: a tensor, or a tuple, list or dict of them",
                         "return tensors only (drop or convert the other values, e.g. in a wrapper module)")


def positional_module(module: Any, input_names: list[str], output_names: list[str], call: str = "positional") -> Any:
    """``module`` behind the calling convention the converters that start from PyTorch need: inputs positional,
    outputs a tuple in ``output_names`` order. ``call``: how ``module`` takes its inputs: ``positional``,
    ``kwargs`` (Hugging Face transformers) or ``dict`` (sentence-transformers)."""
    import torch

    class Positional(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *args: Any) -> tuple:
            if call == "dict":
                out = self.inner(dict(zip(input_names, args)))
            elif call == "kwargs":
                out = self.inner(**dict(zip(input_names, args)))
            else:
                out = self.inner(*args)
            if isinstance(out, dict) or hasattr(out, "items") and hasattr(out, "keys"):
                return tuple(out[n] for n in output_names)
            return tuple(flatten_outputs(out))

    return Positional().eval()


def output_names_for(out: Any) -> list[str]:
    import torch

    if isinstance(out, torch.Tensor):
        return ["output"]
    if isinstance(out, dict) or hasattr(out, "items") and hasattr(out, "keys"):
        return [str(k) for k, v in out.items() if isinstance(v, torch.Tensor)]
    return [f"output_{i}" for i in range(len(flatten_outputs(out)))]


class TorchRunner(Runner):
    """Runs an ``nn.Module`` (or TorchScript / ExportedProgram module) on numpy feeds, in input order."""

    def __init__(self, module: Any, inputs: list[TensorInfo], output_names: list[str]) -> None:
        self.module = module
        self.inputs = inputs
        self.outputs = [TensorInfo(n, [], "float32") for n in output_names]

    def _infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(feeds[i.name])) for i in self.inputs]
        with torch.inference_mode():
            out = self.module(*args)
        flat = flatten_outputs(out)
        return {o.name: t.detach().cpu().numpy() for o, t in zip(self.outputs, flat)}


class OnnxRunner(Runner):
    """An ONNX file on onnxruntime's CPU provider: the reference for .onnx sources, and the ort target's runner."""

    def __init__(self, path: str, providers: Optional[list[str]] = None, threads: Optional[int] = None,
                 exact: bool = False) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if exact:  # Q/DQ pairs as written: the int8 arithmetic of a device that accumulates in int32
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(path, so, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:
            raise TargetError(f"ONNX Runtime cannot load {path}", str(e).strip().splitlines()[0][:400],
                              "check the model's opset against the installed onnxruntime") from None
        self.inputs, self.outputs = ort_io(self.session)

    def _infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(None, dict(feeds))
        return {o.name: v for o, v in zip(self.outputs, values)}

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
