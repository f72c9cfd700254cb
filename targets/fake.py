"""A fake target for testing orchestration (never shown in --help).

It 'builds' by copying the exported ONNX and runs it with onnxruntime, adding seeded noise of a chosen relative size
(target_options.noise) to every output, so tests can drive the validation gate both ways.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from edgeexport.targets.base import Artifact, Problem, Runner, Target, ort_io

class FakeTarget(Target):
    name = "fake"
    public = False
    precisions = ("fp32",)
    description = "testing only: ONNX copied as is, outputs optionally perturbed (target_options.noise)"
    options_spec = {"noise": (0.0, "relative size of seeded Gaussian noise added to every output")}

    def check(self, config) -> list[Problem]:
        problems = super().check(config)
        noise = config.target_options.get("noise", 0.0)
        if not isinstance(noise, (int, float)) or noise < 0:
            problems.append(Problem("target_options.noise", "noise must be a number >= 0", ""))
        return problems

    def build(self, source, config, calibration, workdir: Path, onnx_path: Path) -> Artifact:
        out = workdir / "fake"
        out.mkdir()
        shutil.copyfile(onnx_path, out / "model.onnx")
        return Artifact("fake", config.precision, out, ["model.onnx"],
                        {"noise": float(config.target_options.get("noise", 0.0))}, {"onnxruntime": "0"})

    def load(self, artifact: Artifact, threads: Optional[int] = None) -> Runner:
        return _FakeRunner(artifact.model_path, artifact.settings["noise"])


class _FakeRunner(Runner):
    def __init__(self, path: Path, noise: float) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.noise = noise
        self.rng = np.random.default_rng(0)
        self.inputs, self.outputs = ort_io(self.session)

    def _infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(None, dict(feeds))
        return {o.name: (v + self.noise * self.rng.standard_normal(v.shape).astype(v.dtype) * (np.abs(v).max() + 1e-6)
                         if self.noise else v) for o, v in zip(self.outputs, values)}
