"""Target registry. Each name maps to a module imported only when that target is used."""

from __future__ import annotations

import importlib

from edgeexport.errors import UsageError

from .base import Artifact, Problem, Runner, Target, TensorInfo  # noqa: F401

# name -> (module, class name). Adding a target = one module here + an extra in pyproject.toml.
REGISTRY: dict[str, tuple[str, str]] = {
    "ort": ("edgeexport.targets.onnxruntime", "OrtTarget"),
    "tflite": ("edgeexport.targets.tflite", "TfliteTarget"),
    "trt": ("edgeexport.targets.tensorrt", "TrtTarget"),
    "fake": ("edgeexport.targets.fake", "FakeTarget"),
}
PUBLIC = ("ort", "tflite", "trt")  # shown in --help; 'fake' exists for testing orchestration


def get_target(name: str) -> Target:
    if name not in REGISTRY:
        raise UsageError(
            f"unknown target {name!r}",
            f"known targets: {', '.join(PUBLIC)}",
            "pass --target ort, tflite or trt",
        )
    module, cls = REGISTRY[name]
    return getattr(importlib.import_module(module), cls)()
