"""Hugging Face model directories (``hf:PATH``): exported with optimum's ONNX exporter (the ``[hf]`` extra).

optimum knows each architecture's input/output names and dynamic axes; the reference is the same model in
PyTorch eager mode, loaded the way optimum loads it (transformers or sentence-transformers). The tokenizer files
travel into the bundle so the device can turn strings into input ids with the ``tokenizers`` package alone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edgeexport.config import InputSpec
from edgeexport.errors import ExportError, ModelLoadError, missing_extra
from edgeexport.source_base import ModelSource, _short
from edgeexport.runner import Runner, TensorInfo
from edgeexport.util import quiet, tmp_prefix

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_DIM_NAMES = {"batch_size": "batch", "sequence_length": "sequence"}


class HFModelSource(ModelSource):
    kind = "hf"
    reference_kind = "PyTorch eager (the Hugging Face model)"

    def __init__(self, spec: str, task: str | None) -> None:
        self.spec = spec
        self.path = Path(spec[len("hf:"):])
        self.task: str = task or "feature-extraction"
        if not (self.path / "config.json").is_file():
            raise ModelLoadError(f"{str(self.path)!r} is not a Hugging Face model directory (no config.json)", "",
                                 "point hf: at a folder saved with save_pretrained()")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub at build time
        try:
            with quiet():  # transformers imports torchao where it is installed (litert-torch brings it): it logs
                import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX export configs)
                from optimum.exporters.tasks import TasksManager
        except ImportError:
            raise missing_extra("optimum-onnx", "hf", "exporting Hugging Face models") from None
        try:
            with quiet():
                self.library = TasksManager.infer_library_from_model(str(self.path))
                self.module = TasksManager.get_model_from_task(self.task, str(self.path), library_name=self.library)
                self.module.eval()
                ctor = TasksManager.get_exporter_config_constructor(
                    exporter="onnx", model=self.module, task=self.task, library_name=self.library)
                onnx_config = ctor(self._config())
        except Exception as e:
            raise ModelLoadError(f"cannot load {str(self.path)!r} for task {self.task!r}", _short(e, 400),
                                 "check --task (e.g. feature-extraction, text-classification) and the folder") from None
        self.declared_inputs = [
            InputSpec(name=name, shape=[_DIM_NAMES.get(axes.get(i, ""), axes.get(i)) or 1 for i in range(2)],
                      dtype="int64")
            for name, axes in onnx_config.inputs.items()
        ]
        self.input_names = [s.name for s in self.declared_inputs]
        self._outputs = list(onnx_config.outputs)

    def _config(self) -> Any:
        cfg = getattr(self.module, "config", None)
        if cfg is None:  # sentence-transformers wraps the transformer
            cfg = self.module[0].auto_model.config
        return cfg

    @property
    def tokenizer_file(self) -> Path | None:
        f = self.path / "tokenizer.json"
        return f if f.is_file() else None

    def bundle_files(self) -> dict[str, Path]:
        return tokenizer_files(self.path)

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "task": self.task, "library": self.library}

    def export_onnx(self, path: Path, specs: list[InputSpec], opset: int) -> list[str]:
        optimum_export(self.path, path, self.task, opset, self.library, "optimum's ONNX export failed",
                       "check that optimum supports this architecture and task, or try another --opset")
        import onnx

        model = onnx.load(str(path))
        return [o.name for o in model.graph.output]

    def torch_module(self, specs: list[InputSpec], output_names: list[str]) -> Any:
        from edgeexport.reference import positional_module

        call = "dict" if self.library == "sentence_transformers" else "kwargs"
        return positional_module(self.module, [s.name for s in specs], output_names, call)

    def reference(self, specs: list[InputSpec], output_names: list[str]) -> Runner:
        return HFRunner(self.module, self.library, [TensorInfo(s.name, s.shape, s.dtype) for s in specs], output_names)


def _tail(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return f" ({lines[-1][:200]})" if lines else ""


class HFRunner(Runner):
    """The Hugging Face model in PyTorch eager mode, returning the exported graph's outputs by name."""

    def __init__(self, module: Any, library: str, inputs: list[TensorInfo], output_names: list[str]) -> None:
        self.module, self.library, self.inputs = module, library, inputs
        self.outputs = [TensorInfo(n, [], "float32") for n in output_names]

    def _infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
        with torch.inference_mode():
            out = self.module(tensors) if self.library == "sentence_transformers" else self.module(**tensors)
        return {o.name: out[o.name].detach().cpu().numpy() for o in self.outputs}


def tokenizer_files(folder: Path) -> dict[str, Path]:
    """The tokenizer files of a model folder, keyed by where the bundle's loader looks for them."""
    from edgeexport.bundle.loader import TOKENIZER_FILE

    where = TOKENIZER_FILE.rsplit("/", 1)[0]
    return {f"{where}/{n}": folder / n for n in TOKENIZER_FILES if (folder / n).is_file()}


def optimum_export(model_dir: str | Path, dst: Path, task: str, opset: int, library: str | None, what: str,
                   fix: str) -> None:
    """optimum's ONNX export of ``model_dir`` for ``task`` into ``dst`` (one graph, under 2 GB); ``what`` and ``fix``
    word the ExportError when optimum fails."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix=tmp_prefix("hf-")) as tmp, quiet() as log:
        try:  # imported quietly: transformers imports torchao where it is installed, which logs
            from optimum.exporters.onnx import main_export
        except ImportError:
            raise missing_extra("optimum-onnx", "hf", "exporting Hugging Face models") from None
        try:
            main_export(str(model_dir), output=tmp, task=task, opset=opset, do_validation=False,
                        library_name=library, device="cpu")
        except Exception as e:
            raise ExportError(what, _short(e, 500) + _tail(log.getvalue()), fix) from None
        if (Path(tmp) / "model.onnx_data").exists():
            raise ExportError("the model is over 2 GB", "optimum wrote external weights", "edge bundles need < 2 GB")
        shutil.copyfile(Path(tmp) / "model.onnx", dst)


def export_with_past(model_dir: str | Path, dst: Path, opset: int = 18) -> list[str]:
    """A Hugging Face causal LM exported by optimum as one KV-cache graph (task text-generation-with-past: the
    prefill feeds an empty cache, each decode step one token and the cache; see edgeexport.generation). Writes
    ``dst``; returns the graph's input names. Raises ExportError where optimum has no such path."""
    optimum_export(model_dir, dst, "text-generation-with-past", opset, None,
                   "optimum cannot export this model as a decoder with a KV cache",
                   "check that optimum supports the architecture for text-generation-with-past")
    import onnx

    return [i.name for i in onnx.load(str(dst), load_external_data=False).graph.input]
