"""ONNX Runtime target: fp32, fp16, int8 dynamic and int8 static (QDQ, per-channel weights, real calibration)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import numpy as np

from edgeexport.errors import TargetError
from edgeexport.quantize import calibrate_ranges, nonfinite_exclusions, preprocess, quantize_qdq, to_fp16
from edgeexport.targets.base import Artifact, Problem, Runner, Target, ort_io
from edgeexport.util import quiet

if TYPE_CHECKING:  # pragma: no cover
    from edgeexport.calibration import CalibrationSet
    from edgeexport.config import BuildConfig
    from edgeexport.source import ModelSource

MODEL_FILE = "model.onnx"
# target_options this target understands, with their defaults and a one-line meaning (shown in errors and docs)
OPTIONS: dict[str, tuple[Any, str]] = {
    "per_channel": (True, "per-channel weight scales (int8, int8-dynamic)"),
    "reduce_range": (True, "7-bit weights: avoids U8S8 saturation on x86 CPUs without VNNI (int8)"),
    "activation_type": ("uint8", "int8 activation type: uint8 (asymmetric) or int8"),
    "op_types": (None, "restrict quantization to these op types, e.g. [Conv, MatMul]"),
    "exclude_nodes": ([], "node names to keep in float"),
}


class OrtTarget(Target):
    name = "ort"
    extra = ""
    precisions = ("fp32", "fp16", "int8-dynamic", "int8")
    description = "ONNX Runtime (CPU and any ORT execution provider)"
    options_spec = OPTIONS

    def check(self, config: "BuildConfig") -> list[Problem]:
        problems = super().check(config)
        opts = config.target_options
        for key in ("per_channel", "reduce_range"):
            if key in opts and not isinstance(opts[key], bool):
                problems.append(Problem(f"target_options.{key}", f"{key} must be true or false", ""))
        if opts.get("activation_type", "uint8") not in ("uint8", "int8"):
            problems.append(Problem("target_options.activation_type", "activation_type must be uint8 or int8", ""))
        for key in ("op_types", "exclude_nodes"):
            v = opts.get(key)
            if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                problems.append(Problem(f"target_options.{key}", f"{key} must be a list of strings", ""))
        return problems

    def layer_fallback(self, config: "BuildConfig") -> str:
        return "" if config.precision == "int8" else "needs --precision int8 (a static Q/DQ graph; nodes are kept " \
            "in float through exclude_nodes)"

    def options(self, config: "BuildConfig") -> dict[str, Any]:
        return {k: config.target_options.get(k, default) for k, (default, _) in OPTIONS.items()}

    def build(self, source: "ModelSource", config: "BuildConfig", calibration: "CalibrationSet", workdir: Path,
              onnx_path: Path) -> Artifact:
        out_dir = workdir / "ort"
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / MODEL_FILE
        opts = self.options(config)
        settings: dict[str, Any] = {"format": "onnx"}
        notes: list[str] = []
        if config.precision == "fp32":
            shutil.copyfile(onnx_path, out)
        elif config.precision == "fp16":
            settings.update(to_fp16(onnx_path, out))
        elif config.precision == "int8-dynamic":
            settings.update(quantize_dynamic(onnx_path, out, opts))
        else:
            s, n = quantize_static(onnx_path, out, opts, config, calibration, workdir)
            settings.update(s)
            notes.extend(n)
        import onnxruntime

        artifact = Artifact("ort", config.precision, out_dir, [MODEL_FILE], settings,
                            {"onnxruntime": onnxruntime.__version__}, notes)
        if config.precision == "int8":
            artifact.float_model = workdir / "preprocessed.onnx"
        return artifact

    def load(self, artifact: Artifact, threads: Optional[int] = None) -> Runner:
        return OrtRunner(str(artifact.model_path), threads=threads)

    def requirements(self, artifact: Artifact) -> list[str]:
        major, minor = artifact.runtime["onnxruntime"].split(".")[:2]
        return ["numpy", f"onnxruntime>={major}.{minor}"]


def quantize_dynamic(src: Path, dst: Path, opts: dict[str, Any]) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    with quiet():
        try:
            ort_quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=opts["per_channel"],
                                 reduce_range=opts["reduce_range"],
                                 op_types_to_quantize=opts["op_types"], nodes_to_exclude=opts["exclude_nodes"])
        except Exception as e:
            raise TargetError("ONNX Runtime dynamic quantization failed", f"{type(e).__name__}: {e}",
                              "try --precision int8 (static) or exclude the failing op types") from None
    return {"quantization": "dynamic", "weight_type": "int8", "activations": "quantized at run time (uint8)",
            "per_channel": opts["per_channel"], "reduce_range": opts["reduce_range"],
            "op_types": opts["op_types"] or "ORT default",
            "exclude_nodes": opts["exclude_nodes"]}


def quantize_static(src: Path, dst: Path, opts: dict[str, Any], config: "BuildConfig",
                    calibration: "CalibrationSet", workdir: Path) -> tuple[dict[str, Any], list[str]]:
    pre = workdir / "preprocessed.onnx"
    notes = preprocess(src, pre)
    nonfinite, more = nonfinite_exclusions(pre, calibration)
    notes += more
    exclude = sorted(set(opts["exclude_nodes"]) | set(nonfinite))
    method = config.calibration.method
    ranges = workdir / "ranges.json"
    used, more = calibrate_ranges(pre, calibration, method, config.calibration.percentile, ranges, opts["op_types"])
    notes += more
    quantize_qdq(pre, dst, ranges, used, per_channel=opts["per_channel"], reduce_range=opts["reduce_range"],
                 activation_type=opts["activation_type"], op_types=opts["op_types"], exclude_nodes=exclude)
    settings = {
        "quantization": "static", "format": "onnx-qdq", "calibration_method": used,
        "calibration_method_requested": method, "calibration_samples": len(calibration.calib_idx),
        "weight_type": "int8", "activation_type": opts["activation_type"], "per_channel": opts["per_channel"],
        "reduce_range": opts["reduce_range"], "op_types": opts["op_types"] or "ORT default",
        "exclude_nodes": exclude,
    }
    if used == "percentile":
        settings["percentile"] = config.calibration.percentile
    return settings, notes


class OrtRunner(Runner):
    def __init__(self, path: str, providers: Optional[list[str]] = None, threads: Optional[int] = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
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
