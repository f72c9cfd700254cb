"""Target registry. Each name maps to a module imported only when that target is used."""

from __future__ import annotations

import importlib

from edgeexport.errors import UsageError

from .base import Artifact, CliOption, Problem, Runner, Target, TensorInfo  # noqa: F401

# name -> (module, class name). Adding a target = its unit targets/<name>/ (target.py + backend.py), a line here and
# an extra in pyproject.toml.
REGISTRY: dict[str, tuple[str, str]] = {
    "ort": ("edgeexport.targets.ort.target", "OrtTarget"),
    "tflite": ("edgeexport.targets.tflite.target", "TfliteTarget"),
    "trt": ("edgeexport.targets.trt.target", "TrtTarget"),
    "openvino": ("edgeexport.targets.openvino.target", "OpenvinoTarget"),
    "fake": ("edgeexport.targets.fake", "FakeTarget"),
}
DEFAULT_TARGET = "ort"  # the core target: no extra, any input shapes


def get_target(name: str) -> Target:
    if name not in REGISTRY:
        names = public_names()
        raise UsageError(
            f"unknown target {name!r}",
            f"known targets: {', '.join(names)}",
            f"pass --target {', '.join(names[:-1])} or {names[-1]}",
        )
    module, cls = REGISTRY[name]
    return getattr(importlib.import_module(module), cls)()


def all_targets(public_only: bool = True) -> list[Target]:
    """Every registered target (their modules are light: heavy libraries load inside build and load)."""
    return [t for t in (get_target(n) for n in REGISTRY) if t.public or not public_only]


def public_names() -> list[str]:
    return [t.name for t in all_targets()]


def known_precisions() -> tuple[str, ...]:
    return tuple(dict.fromkeys(p for t in all_targets(public_only=False) for p in t.precisions))


def layer_search_names() -> str:
    """'ort, trt': the targets whose int8 builds rank layers (for help texts)."""
    return ", ".join(t.name for t in all_targets() if t.layer_search)


def target_help() -> str:
    """One line per target for --help: name, what it is, its precisions and the extra it needs."""
    return "; ".join(f"{t.name} ({t.description}; {', '.join(t.precisions)}"
                     + (f"; pip install 'edgeexport[{t.extra}]'" if t.extra else "") + ")" for t in all_targets())


def _import_backend(name: str) -> None:
    """Build time: a bundle loaded through edgeexport.bundle.loader imports its target's backend on first use."""
    module = REGISTRY.get(name, ("",))[0]
    if module.endswith(".target"):
        importlib.import_module(module[: -len("target")] + "backend")


def _hook_loader() -> None:
    from edgeexport.bundle import loader

    loader._FIND_BACKEND = _import_backend  # the core's build-time hook


_hook_loader()
