"""The ModelSource contract: what the pipeline asks of a loaded model, whatever it was loaded from. The sources
themselves live in source.py (PyTorch, TorchScript, torch.export, ONNX) and source_hf.py (Hugging Face)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from edgeexport.config import InputSpec
from edgeexport.runner import Runner
from edgeexport.util import strip_ansi


class ModelSource:
    """A loaded model. Subclasses: TorchModelSource (nn.Module / TorchScript / ExportedProgram), OnnxModelSource."""

    kind: str = ""
    spec: str = ""
    #: what the spec says about the inputs (names and maybe shapes); None = unknown until data or --input says
    declared_inputs: Optional[list[InputSpec]] = None
    input_names: Optional[list[str]] = None
    #: the task the source implies (e.g. a Hugging Face head); None = the user's --task or none
    task: Optional[str] = None
    #: the input names come from a compiled graph (TorchScript, torch.export), not from the user's code: with one
    #: input and one data array, the data's name is the better one
    generic_names: bool = False
    #: what the reference the build validates and times against is (the manifest's benchmark says it)
    reference_kind: str = "PyTorch eager (the nn.Module the factory returned)"

    @property
    def tokenizer_file(self) -> Optional[Path]:
        """A tokenizer.json that text calibration and the bundle use (None: the model takes arrays)."""
        return None

    def bundle_files(self) -> dict[str, Path]:
        """Extra files the bundle ships (bundle-relative path -> source file), e.g. the tokenizer."""
        return {}

    def reference_bytes(self) -> Optional[int]:
        """Size of the model as the user gave it, for size comparisons (None: unknown)."""
        path = Path(self.spec)
        return path.stat().st_size if path.is_file() else None

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind}

    def export_onnx(self, path: Path, specs: list[InputSpec], opset: int) -> list[str]:  # pragma: no cover
        """Write ONNX to ``path``; return the output names."""
        raise NotImplementedError

    def reference(self, specs: list[InputSpec], output_names: list[str]) -> Runner:  # pragma: no cover
        raise NotImplementedError

    def runs_with(self, specs: list[InputSpec]) -> Optional[bool]:
        """Whether the model runs on zeros of these input shapes (None: cannot tell without running an export).
        Used to tell a sample's shape from the data where the model does not say it."""
        return None

    def torch_module(self, specs: list[InputSpec], output_names: list[str]) -> Any:
        """The model as a ``torch.nn.Module`` that takes the inputs positionally (in ``specs`` order) and returns a
        tuple of the outputs in ``output_names`` order, for converters that start from PyTorch (litert-torch).
        None where the source holds no PyTorch model (an ONNX file)."""
        return None


def _short(e: BaseException, limit: int = 600) -> str:
    text = strip_ansi(str(e)).strip() or type(e).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."
