"""The PyTorch reference Runner: the user's model in eager mode, the ground truth for validation."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from edgeexport.targets.base import Runner, TensorInfo


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
    raise TypeError(f"model output of type {type(out).__name__} is not a tensor, tuple, list or dict")


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
