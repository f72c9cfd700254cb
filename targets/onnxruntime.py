"""ONNX Runtime target: fp32, fp16, int8 dynamic and int8 static (QDQ, per-channel weights, real calibration)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional

import numpy as np

from edgeexport.errors import TargetError
from edgeexport.targets.base import Artifact, Problem, Runner, Target, TensorInfo
from edgeexport.util import progress, quiet

if TYPE_CHECKING:  # pragma: no cover
    from edgeexport.calibration import CalibrationSet
    from edgeexport.config import BuildConfig
    from edgeexport.source import ModelSource

MODEL_FILE = "model.onnx"
ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}
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

        return Artifact("ort", config.precision, out_dir, [MODEL_FILE], settings,
                        {"onnxruntime": onnxruntime.__version__}, notes)

    def load(self, artifact: Artifact, threads: Optional[int] = None) -> Runner:
        return OrtRunner(str(artifact.model_path), threads=threads)

    def requirements(self, artifact: Artifact) -> list[str]:
        major, minor = artifact.runtime["onnxruntime"].split(".")[:2]
        return ["numpy", f"onnxruntime>={major}.{minor}"]


def to_fp16(src: Path, dst: Path) -> dict[str, Any]:
    import onnx
    from onnxruntime.transformers import float16

    with quiet():
        model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    return {"fp16_converter": "onnxruntime.transformers.float16", "keep_io_types": True}


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


class _Reader:
    """onnxruntime CalibrationDataReader over the calibration split (never the holdout)."""

    def __init__(self, feeds: Iterator[dict[str, np.ndarray]]) -> None:
        self._it = feeds

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - not used by the calibrators we call
        raise NotImplementedError


def _preprocess(src: Path, dst: Path) -> list[str]:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes = []
    # symbolic shape inference writes temporary files (sym_shape_infer_temp.onnx, <uuid>.data) to the current
    # directory: keep them in the build's temporary folder
    with quiet(), contextlib.chdir(dst.parent):
        try:
            quant_pre_process(str(src), str(dst))
        except Exception as e:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
            notes.append(f"symbolic shape inference failed ({type(e).__name__}); pre-processed with skip_symbolic_shape=True")
    return notes


def quantize_static(src: Path, dst: Path, opts: dict[str, Any], config: "BuildConfig",
                    calibration: "CalibrationSet", workdir: Path) -> tuple[dict[str, Any], list[str]]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    pre = workdir / "preprocessed.onnx"
    notes = _preprocess(src, pre)
    probe = [f for f, _ in zip(calibration.calibration(), range(_PROBE_SAMPLES))]
    nonfinite = nonfinite_nodes(pre, probe)
    if nonfinite:
        notes.append(f"kept {len(nonfinite)} node(s) in float because their tensors hold -inf/inf/NaN on calibration "
                     f"data (e.g. additive attention masks), which no 8-bit range can represent: "
                     f"{', '.join(nonfinite[:5])}{' ...' if len(nonfinite) > 5 else ''}")
        opts = dict(opts, exclude_nodes=sorted(set(opts["exclude_nodes"]) | set(nonfinite)))
    method = config.calibration.method
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    n = len(calibration.calib_idx)

    def run(m: str, extra_options: dict[str, Any]) -> None:
        feeds = progress(calibration.calibration(), f"calibrating ({m}, {n} samples)", total=n)
        with quiet():
            ort_quantize_static(
                str(pre), str(dst), _Reader(iter(feeds)), quant_format=QuantFormat.QDQ,
                per_channel=opts["per_channel"], reduce_range=opts["reduce_range"],
                activation_type=QuantType.QUInt8 if opts["activation_type"] == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8, calibrate_method=methods[m],
                op_types_to_quantize=opts["op_types"], nodes_to_exclude=opts["exclude_nodes"],
                extra_options=extra_options,
            )

    # Histogram calibrators (entropy, percentile) break on tensors holding -inf/huge values, e.g. additive attention
    # masks ("Too many bins", "range is not finite"). Fall back, in order, and say so.
    chain = {"entropy": ["entropy", "percentile", "minmax"], "percentile": ["percentile", "minmax"]}.get(method, [method])
    failures: list[str] = []
    used = ""
    for m in chain:
        try:
            run(m, {"CalibPercentile": config.calibration.percentile} if m == "percentile" else {})
            used = m
            break
        except Exception as e:
            failures.append(f"{m}: {type(e).__name__}: {str(e)[:160]}")
    if not used:
        raise TargetError(f"ONNX Runtime static quantization failed ({', '.join(chain)} calibration)",
                          "; ".join(failures),
                          "exclude the failing nodes (--option exclude_nodes=[...]) or try --precision int8-dynamic")
    if failures:
        notes.append(f"{method} calibration failed ({failures[0]}); used {used} instead")
    settings = {
        "quantization": "static", "format": "onnx-qdq", "calibration_method": used,
        "calibration_method_requested": method, "calibration_samples": n, "weight_type": "int8",
        "activation_type": opts["activation_type"], "per_channel": opts["per_channel"],
        "reduce_range": opts["reduce_range"], "op_types": opts["op_types"] or "ORT default",
        "exclude_nodes": opts["exclude_nodes"],
    }
    if used == "percentile":
        settings["percentile"] = config.calibration.percentile
    return settings, notes


_PROBE_SAMPLES = 8


def nonfinite_nodes(model_path: Path, feeds: list[dict[str, np.ndarray]]) -> list[str]:
    """Names of nodes that produce or consume float tensors holding non-finite values on ``feeds``."""
    import onnx
    import onnxruntime as ort

    if not feeds:
        return []
    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    typed = {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.output)}
    existing = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            vi = typed.get(name)
            if vi is not None and name not in existing and vi.type.tensor_type.elem_type in float_types:
                model.graph.output.append(vi)
                existing.add(name)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    bad: set[str] = set()
    for feed in feeds:
        for name, value in zip(names, sess.run(None, feed)):
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                bad.add(name)
    return sorted({n.name or n.output[0] for n in model.graph.node if bad & (set(n.output) | set(n.input))})


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
        self.inputs = [TensorInfo(i.name, list(i.shape), ORT_TYPES.get(i.type, i.type)) for i in self.session.get_inputs()]
        self.outputs = [TensorInfo(o.name, list(o.shape), ORT_TYPES.get(o.type, o.type)) for o in self.session.get_outputs()]

    def _infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(None, dict(feeds))
        return {o.name: v for o, v in zip(self.outputs, values)}

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
