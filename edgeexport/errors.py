"""User-facing errors.

Every error a user can cause is an :class:`EdgeExportError` that carries *what* failed, *why*, and *how to fix
it*. The CLI prints these without a traceback and exits with :attr:`EdgeExportError.exit_code`. Real bugs are
ordinary exceptions and keep their traceback.
"""

from __future__ import annotations

from typing import Any, Optional


class EdgeExportError(Exception):
    """A failure the user can act on."""

    exit_code = 1

    def __init__(self, what: str, why: str = "", fix: str = "") -> None:
        self.what = what
        self.why = why
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"error: {self.what}"]
        if self.why:
            lines.append(f"  why: {self.why}")
        if self.fix:
            lines.append(f"  fix: {self.fix}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, str]:
        return {"error": type(self).__name__, "what": self.what, "why": self.why, "fix": self.fix}


class UsageError(EdgeExportError):
    """Bad command-line usage or configuration values."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file or option value that does not validate."""


class ModelLoadError(EdgeExportError):
    """The model spec does not resolve or the model cannot be built."""


class ExportError(EdgeExportError):
    """PyTorch -> ONNX export failed."""


class PruneError(EdgeExportError):
    """The model cannot be pruned as asked, or its recovery training failed."""


class CalibrationError(EdgeExportError):
    """Calibration / validation data is missing, malformed or does not match the model."""


class TargetError(EdgeExportError):
    """A target backend cannot build or load the model."""


class MissingExtraError(EdgeExportError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the Python package '{package}', which is not installed",
            "it is an optional dependency of edgeexport",
            f"pip install 'edgeexport[{extra}]'",
        )


class ValidationFailed(EdgeExportError):
    """The built model's outputs are outside tolerance; no bundle was written. Carries what was measured: the
    validation report, per-sample errors, the refusal's diagnosis, and an accuracy-budget search's record."""

    def __init__(self, what: str, why: str = "", fix: str = "", *, report: Any = None,
                 errors: Optional[dict[str, Any]] = None, diagnosis: Optional[dict[str, Any]] = None,
                 budget: Optional[dict[str, Any]] = None) -> None:
        super().__init__(what, why, fix)
        self.report = report
        self.errors = errors or {}
        self.diagnosis = diagnosis
        self.budget = budget


class MissingOpsError(TargetError):
    """The target's converter has no builtin op for some of the graph's ops."""

    def __init__(self, what: str, why: str = "", fix: str = "", *, missing_ops: tuple[str, ...] = ()) -> None:
        super().__init__(what, why, fix)
        self.missing_ops = tuple(missing_ops)


class BundleError(EdgeExportError):
    """A bundle is missing, tampered with, or cannot be written."""


def missing_extra(package: str, extra: str, purpose: str) -> MissingExtraError:
    return MissingExtraError(package, extra, purpose)
