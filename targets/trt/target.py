"""TensorRT target for Jetson and NVIDIA GPUs: fp32, fp16 and int8 (explicit Q/DQ, or TensorRT 10's calibration cache).

An engine is tied to the GPU model and the TensorRT version, and most exports happen without the device's GPU. So
the bundle always carries the ONNX TensorRT builds from, the builder settings (manifest), ``build_engine.sh``
(trtexec, TensorRT 10 and 11) and the loader, which builds the engine on first load and caches it. With TensorRT and
a GPU present, ``--engine now`` (or ``auto``) also builds the engine here and validates it.

Without TensorRT, validation runs the very ONNX TensorRT will consume on onnxruntime (CPU), with graph optimizations
off so every Q/DQ pair runs as written (float fake-quantization): that checks the scales and their placement
numerically, not TensorRT's kernels. The manifest and report say which of the two was validated.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import numpy as np

from edgeexport.targets.trt.backend import write_calibration_cache
from edgeexport.errors import ConfigError, TargetError
from edgeexport.quantize import (calibrate_ranges, load_ranges, nonfinite_exclusions, preprocess, quantize_qdq,
                                 requantize_corrected, smooth_for_int8, to_fp16, wide_range_exclusions)
from edgeexport.recipes import record_integer_share
from edgeexport.targets.base import Artifact, CliOption, Problem, Runner, Target, one_of, ort_io

if TYPE_CHECKING:  # pragma: no cover
    from edgeexport.calibration import CalibrationSet
    from edgeexport.config import BuildConfig, InputSpec
    from edgeexport.source import ModelSource

MODEL_FILE = "model.onnx"
ENGINE_FILE = "model.plan"
CACHE_FILE = "calibration.cache"
SCRIPT_FILE = "build_engine.sh"
TRT_MAJORS = [10, 11]
DEVICE_COMMANDS = [
    "pip install -r requirements.txt   # numpy + cuda-python; TensorRT: JetPack on Jetson, see the file on x86",
    "python3 loader.py --selftest      # checks TensorRT and the GPU, builds and caches the engine on first use",
    "sh build_engine.sh model.plan     # or the same build with trtexec (TensorRT 10 and 11)",
]
WEIGHTED_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul"]
# which input of each weighted op is the weight, and the weight's output-channel axis (per-channel scales)
_WEIGHT_AXIS: dict[str, tuple[int, int]] = {"Conv": (1, 0), "ConvTranspose": (1, 1), "Gemm": (1, 1), "MatMul": (1, -1)}

OPTIONS: dict[str, tuple[Any, str]] = {
    "engine": ("auto", "auto | now | deferred: build the engine here (needs TensorRT + GPU) or on the device"),
    "int8_path": ("explicit", "int8: explicit (Q/DQ graph; TensorRT 10 and 11) or implicit (calibration cache; "
                              "TensorRT 10 only)"),
    "profiles": ({}, "dynamic dims: {dim: [min, opt, max]}, e.g. {batch: [1, 8, 32]} [default: from the data]"),
    "workspace_mb": (1024, "builder workspace limit in MiB"),
    "timing_cache": (True, "keep a timing cache next to the engine cache (faster rebuilds)"),
    "dla_core": (None, "run on this DLA core (Jetson AGX/NX), fp16/int8 only"),
    "gpu_fallback": (True, "with dla_core: layers the DLA cannot run fall back to the GPU"),
    "hardware_compatibility": ("none", "none | ampere+: one engine for every Ampere-or-newer GPU (slower)"),
    "version_compatible": (False, "engine runs on newer TensorRT minors of the same major (lean runtime)"),
    "trt_version": ("10.3.0", "TensorRT version the calibration cache header names (JetPack 6: 10.3.0); "
                              "the loader re-heads it for the device's version"),
    "op_types": (WEIGHTED_OPS, "int8: op types whose inputs get Q/DQ (TensorRT's recommended placement)"),
    "exclude_nodes": ([], "int8: node names to keep in float"),
    "bias_correction": (True, "int8: subtract the mean shift that weight rounding causes from each Conv/Gemm bias"),
    "weight_rounding": ("gptq", "int8: gptq (round weights column by column, each error compensated by the columns "
                                "not yet rounded, from calibration inputs) or nearest"),
    "recipe": ("auto", "int8: full (Q/DQ on the inputs of every op in op_types), weighted (only those with constant "
                       "weights: attention's activation x activation MatMuls stay float), auto (weighted for "
                       "transformers, full otherwise)"),
    "smoothquant": ("auto", "int8: move activation outliers into the weights of constant-weight MatMuls "
                            "(SmoothQuant): auto (transformers), true, false"),
    "wide_range_float": (True, "int8: keep float the layers whose input spans too many orders of magnitude for "
                               "one 8-bit range (most of its nonzero values would round to zero)"),
}
_TYPES = {"workspace_mb": int, "timing_cache": bool, "bias_correction": bool, "gpu_fallback": bool,
          "wide_range_float": bool,
          "version_compatible": bool, "trt_version": str, "profiles": dict}


class TrtTarget(Target):
    name = "trt"
    extra = "trt"  # needed on the device and for --engine now; bundles build without it
    precisions = ("fp32", "fp16", "int8")
    description = "TensorRT (Jetson, NVIDIA GPUs): engine built here or on the device"
    precision_labels = {"fp16": "fp16 (float16 graph for TensorRT, float32 inputs/outputs)",
                        "int8": "int8 (TensorRT: explicit Q/DQ, or implicit calibration cache on TensorRT 10)"}
    runtime_packages = ("tensorrt",)
    decoder_refusal = ("TensorRT runs decoders through TensorRT-LLM / TensorRT Edge-LLM engines, which this tool "
                       "does not build")
    cli_options = (CliOption("--engine", "engine", "trt: build the TensorRT engine here (now; needs TensorRT and a GPU) "
                             "or on the device on first load (deferred) [default: auto = now when TensorRT and a GPU "
                             "are here].", ("auto", "now", "deferred")),)
    options_spec = OPTIONS
    layer_search = True
    calib_methods = ("minmax", "percentile", "entropy")

    def trial_overrides(self, config: "BuildConfig") -> dict[str, Any]:
        return {"engine": "deferred"}  # trial rounds validate the ONNX; only the final build makes an engine

    def check(self, config: "BuildConfig") -> list[Problem]:
        problems = super().check(config)
        o = self.options(config)
        for key, typ in _TYPES.items():
            if not isinstance(o[key], typ) or (typ is int and isinstance(o[key], bool)):
                problems.append(Problem(f"target_options.{key}", f"{key} must be a {typ.__name__}", ""))
        choices = {"engine": ("auto", "now", "deferred"), "int8_path": ("explicit", "implicit"),
                   "hardware_compatibility": ("none", "ampere+"), "recipe": ("auto", "full", "weighted"),
                   "smoothquant": ("auto", True, False), "weight_rounding": ("gptq", "nearest")}
        for key, allowed in choices.items():
            if not one_of(o[key], allowed):
                names = ", ".join(str(a).lower() if isinstance(a, bool) else a for a in allowed)
                problems.append(Problem(f"target_options.{key}", f"{key} must be one of {names}", ""))
        for key in ("int8_path", "recipe", "smoothquant", "weight_rounding"):
            if key in config.target_options and config.precision != "int8":
                problems.append(Problem(f"target_options.{key}", f"{key} applies to --precision int8 only", ""))
        if "weight_rounding" in config.target_options and o["int8_path"] == "implicit":
            problems.append(Problem("target_options.weight_rounding", "weight_rounding applies to the explicit Q/DQ "
                                    "path; with int8_path=implicit TensorRT rounds the weights itself",
                                    "drop weight_rounding or use int8_path=explicit"))
        if o["dla_core"] is not None:
            if not isinstance(o["dla_core"], int) or isinstance(o["dla_core"], bool) or o["dla_core"] < 0:
                problems.append(Problem("target_options.dla_core", "dla_core must be a DLA core number (0, 1)", ""))
            elif config.precision == "fp32" and not o["gpu_fallback"]:
                problems.append(Problem("target_options.dla_core", "the DLA runs fp16 and int8 only",
                                        "use --precision fp16 or int8, or keep gpu_fallback=true"))
        if isinstance(o["workspace_mb"], int) and o["workspace_mb"] < 16:
            problems.append(Problem("target_options.workspace_mb", "workspace_mb must be at least 16", ""))
        return problems

    def options(self, config: "BuildConfig") -> dict[str, Any]:
        return {k: config.target_options.get(k, default) for k, (default, _) in OPTIONS.items()}

    def check_inputs(self, specs: list, max_length: int = 128) -> list[Problem]:
        bad = [s.name for s in specs if any(ch in s.name for ch in ",:'\"\n")]
        return [Problem("inputs", f"input name(s) {bad} hold characters trtexec shape lists cannot carry",
                        "rename the inputs (--input)")] if bad else []

    def layer_fallback(self, config: "BuildConfig") -> str:
        if config.precision != "int8" or config.target_options.get("int8_path", "explicit") != "explicit":
            return "needs --precision int8 with the explicit Q/DQ path (nodes are kept in float through exclude_nodes)"
        return ""

    def build(self, source: "ModelSource", config: "BuildConfig", calibration: "CalibrationSet", workdir: Path,
              onnx_path: Path) -> Artifact:
        out = workdir / "trt"
        out.mkdir(parents=True, exist_ok=True)
        o = self.options(config)
        settings: dict[str, Any] = {"format": "onnx for TensorRT"}
        files = [MODEL_FILE]
        int8_path = o["int8_path"] if config.precision == "int8" else None
        profiles, notes = resolve_profiles(config.inputs, o["profiles"], calibration)
        if config.precision == "fp32":
            shutil.copyfile(onnx_path, out / MODEL_FILE)
        elif config.precision == "fp16":
            settings.update(to_fp16(onnx_path, out / MODEL_FILE))
        else:
            s, n, scales = quantize_for_tensorrt(onnx_path, out, o, config, calibration, workdir)
            settings.update(s)
            notes += n
            (out / CACHE_FILE).write_text(write_calibration_cache(scales, o["trt_version"]))
            if int8_path == "implicit":
                shutil.copyfile(workdir / "preprocessed.onnx", out / MODEL_FILE)
                files.append(CACHE_FILE)
            else:
                shutil.copyfile(workdir / "qdq.onnx", out / MODEL_FILE)
        builder = {"workspace_mb": o["workspace_mb"], "timing_cache": o["timing_cache"], "dla_core": o["dla_core"],
                   "gpu_fallback": o["gpu_fallback"], "hardware_compatibility": o["hardware_compatibility"],
                   "version_compatible": o["version_compatible"], "profiles": profiles}
        trt_cfg = {"precision": config.precision, "int8_path": int8_path, "builder": builder,
                   "tensorrt_majors": [10] if int8_path == "implicit" else TRT_MAJORS,
                   "calibration_cache": CACHE_FILE if int8_path == "implicit" else None, "engine": None}
        (out / SCRIPT_FILE).write_text(build_script(trt_cfg))
        (out / SCRIPT_FILE).chmod(0o755)
        files.append(SCRIPT_FILE)
        engine_note, runtime = self._engine(o["engine"], out, trt_cfg, files)
        notes.append(engine_note)
        settings.update(int8_path=int8_path, builder=builder, engine_build=engine_note)
        artifact = Artifact("trt", config.precision, out, files, settings, runtime, notes,
                            {"trt": trt_cfg, "onnxruntime_fake_quant": config.precision == "int8",
                             "device_commands": DEVICE_COMMANDS})
        if int8_path == "explicit":
            artifact.float_model = workdir / "preprocessed.onnx"
            record_integer_share(artifact, workdir / "preprocessed.onnx", calibration)
        elif int8_path == "implicit":
            artifact.settings["integer_share"] = {"decided_by": "TensorRT 10's builder at engine build (implicit "
                                                                "int8 picks int8 or float tactics per layer)"}
        if trt_cfg["engine"] is None:
            artifact.validated_with = ("onnxruntime (CPU) running the ONNX TensorRT will build from" +
                                       (", Q/DQ pairs executed as written (fake-quantization)"
                                        if config.precision == "int8" else "") + "; TensorRT itself was not run")
            artifact.bench_skip = "no engine was built here: CPU timings would not say anything about the device"
            # the golden outputs come from onnxruntime on this CPU; the device's TensorRT kernels (TF32, fp16
            # accumulation, int8 tactics) differ more than one runtime across CPUs does
            artifact.golden_tolerance = {"fp32": (1e-2, 0.9999), "fp16": (2e-2, 0.999),
                                         "int8": (1e-1, 0.99)}[config.precision]
        return artifact

    def _engine(self, mode: str, out: Path, trt_cfg: dict[str, Any], files: list[str]) -> tuple[str, dict[str, str]]:
        """Build the engine now when asked or possible; else say plainly that the device will."""
        from edgeexport.bundle.loader import BundleError as DeviceError
        from edgeexport.targets.trt import backend

        try:
            device = backend.trt_device()
        except DeviceError as e:
            if mode == "now":
                raise TargetError("--engine now needs TensorRT and an NVIDIA GPU on this machine", str(e),
                                  "use --engine deferred (the device builds the engine on first load) or run "
                                  "the build where TensorRT is installed") from None
            return (f"engine deferred to the device: {e}. The device's loader builds it on first load and caches it "
                    f"(or run {SCRIPT_FILE} there)", {"tensorrt": "10.0"})
        if mode == "deferred":
            return "engine deferred to the device, as asked (--engine deferred)", {"tensorrt": "10.0"}
        problems = backend.trt_compat_problems(trt_cfg, device)
        if problems:
            raise TargetError("TensorRT on this machine cannot build this bundle's engine", "; ".join(problems),
                              "use --engine deferred")
        calib = (out / CACHE_FILE).read_text() if trt_cfg["calibration_cache"] else None
        try:
            plan, _ = backend._trt_build_engine(out / MODEL_FILE, trt_cfg, calib, None)
        except DeviceError as e:
            raise TargetError("TensorRT failed to build the engine", str(e), "use --engine deferred, or fix the "
                              "op it names") from None
        (out / ENGINE_FILE).write_bytes(plan)
        files.append(ENGINE_FILE)
        trt_cfg["engine"] = {"file": ENGINE_FILE, "built_for": device}
        return (f"engine built here for {device['gpu']} (compute {device['compute_capability']}) with TensorRT "
                f"{device['tensorrt']}; other GPUs or TensorRT versions rebuild it from the ONNX",
                {"tensorrt": device["tensorrt"]})

    def load(self, artifact: Artifact, threads: Optional[int] = None) -> Runner:
        return TrtRunner(artifact, threads)

    def requirements(self, artifact: Artifact) -> list[str]:
        majors = artifact.runtime_config["trt"]["tensorrt_majors"]
        # not a requirement line: pip would try to install it on a Jetson, where it must come from JetPack
        return ["numpy", "cuda-python",
                "# TensorRT is not listed for pip: on Jetson it comes with JetPack (python3-libnvinfer), never pip;",
                f"# on an x86 machine with an NVIDIA GPU: pip install 'tensorrt>={majors[0]},<{majors[-1] + 1}'"]


class TrtRunner(Runner):
    """The engine through the loader's TensorRT backend when one was built here; otherwise the bundle's ONNX on
    onnxruntime exactly as the loader's ``runtime='onnxruntime'`` runs it (the same backend class)."""

    def __init__(self, artifact: Artifact, threads: Optional[int]) -> None:
        from edgeexport.bundle.loader import OnnxSession
        from edgeexport.targets.trt import backend

        manifest = {"runtime": {}, "runtime_config": artifact.runtime_config, "precision": artifact.precision}
        ort = OnnxSession(artifact.model_path, manifest, threads=threads)
        self.inputs, self.outputs = ort_io(ort.session)
        self.backend: Any = ort
        engine = artifact.runtime_config["trt"].get("engine")
        if engine:
            self.backend = backend._TrtSession((artifact.root / engine["file"]).read_bytes())

    def _infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.backend.run(dict(feeds))
        return {o.name: out[o.name] for o in self.outputs}


def quantize_for_tensorrt(onnx_path: Path, out: Path, o: dict[str, Any], config: "BuildConfig",
                          calibration: "CalibrationSet", workdir: Path
                          ) -> tuple[dict[str, Any], list[str], dict[str, float]]:
    """Calibrate every float tensor once; write a Q/DQ graph TensorRT can fuse (symmetric int8, zero points 0,
    per-channel weights, float bias, Q/DQ on the inputs of weighted ops and not on their outputs) and return the per-tensor scales for
    TensorRT 10's calibration cache, both from the same ranges."""
    import onnx

    from edgeexport import recipes

    pre, qdq, ranges = workdir / "preprocessed.onnx", workdir / "qdq.onnx", workdir / "ranges.json"
    notes = preprocess(onnx_path, pre)
    family = recipes.family(onnx.load(str(pre)))
    smoothed = smooth_for_int8(pre, calibration, o["smoothquant"], family)
    nonfinite, more = nonfinite_exclusions(pre, calibration)
    notes += more
    wide, more, wide_record = wide_range_exclusions(pre, calibration, list(o["op_types"] or recipes.INTEGER_INPUT_OPS),
                                                    o["wide_range_float"])
    notes += more
    exclude = sorted(set(o["exclude_nodes"]) | set(nonfinite) | set(wide))
    recipe = o["recipe"] if o["recipe"] != "auto" else ("weighted" if family == "transformer" else "full")
    # weighted: only the weighted ops whose weight is a constant; attention's score and context MatMuls (two
    # activations), softmax and LayerNorm stay float, as on ORT
    nodes = ([n for n in recipes.weighted_nodes(onnx.load(str(pre))) if n not in exclude]
             if recipe == "weighted" else None)
    method = recipes.calib_method(config.calibration.method, family)
    used, more = calibrate_ranges(pre, calibration, method, config.calibration.percentile, ranges, None,
                                  symmetric=True)
    notes += more
    qargs = dict(per_channel=True, reduce_range=False, activation_type="int8",
                 op_types=o["op_types"], exclude_nodes=exclude, nodes=nodes,
                 extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                                # TensorRT's placement: Q/DQ on the inputs of weighted ops, not on their outputs.
                                # A Q/DQ on a raw conv output (before ReLU6) spends 8 bits on a range the next op
                                # clips away: EfficientNet-Lite0 top-1 agreement 0.72 with it, 0.94 without
                                "OpTypesToExcludeOutputQuantization": list(o["op_types"])})
    quantize_qdq(pre, qdq, ranges, used, **qargs)
    corrected = requantize_corrected(pre, qdq, ranges, used, calibration, qargs, o["bias_correction"],
                                     o["weight_rounding"])
    violations = qdq_violations(onnx.load(str(qdq)))
    if violations:
        raise TargetError("the Q/DQ graph breaks TensorRT's rules", "; ".join(violations[:8]),
                          "report this with the model; --option exclude_nodes=[...] keeps the named nodes in float")
    scales = {name: max(abs(lo), abs(hi)) / 127.0 for name, (lo, hi) in load_ranges(ranges).items()
              if np.isfinite(lo) and np.isfinite(hi) and max(abs(lo), abs(hi)) > 0}
    settings = {"quantization": "static", "format": "onnx-qdq (TensorRT explicit quantization)",
                "calibration_method": used, "calibration_method_requested": config.calibration.method,
                "calibration_samples": len(calibration.calib_idx), "weight_type": "int8 symmetric, per-channel",
                "activation_type": "int8 symmetric (zero point 0)", "bias": "float (TensorRT quantizes it itself)",
                "op_types": o["op_types"], "exclude_nodes": exclude, "calibration_cache_tensors": len(scales),
                "recipe": recipe, "recipe_requested": o["recipe"], "graph_family": family, **corrected, **smoothed,
                **wide_record}
    if used == "percentile":
        settings["percentile"] = config.calibration.percentile
    return settings, notes, scales


def qdq_violations(model: Any) -> list[str]:
    """Where a Q/DQ graph breaks the rules TensorRT's explicit quantization needs (empty: none):
    int8 with zero point 0, positive finite scales, no int32 (bias) Q/DQ, Q always followed by DQ, per-channel
    weight scales on the output-channel axis, and weighted ops quantized on both their data and weight inputs."""
    from onnx import TensorProto, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {out: n for n in g.node for out in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    problems = [f"opset {opset} < 13: per-channel Q/DQ needs opset 13"] if opset < 13 else []
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        where = f"{n.op_type} {n.name or n.output[0]}"
        scale = numpy_helper.to_array(inits[n.input[1]]) if n.input[1] in inits else None
        if scale is None or not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            problems.append(f"{where}: scale must be a constant, positive and finite")
        if len(n.input) < 3 or n.input[2] not in inits:
            problems.append(f"{where}: zero point must be an int8 constant (0)")
        else:
            zp = inits[n.input[2]]
            if zp.data_type != TensorProto.INT8:
                problems.append(f"{where}: zero point type {TensorProto.DataType.Name(zp.data_type)}; TensorRT "
                                f"takes int8 only")
            elif np.any(numpy_helper.to_array(zp) != 0):
                problems.append(f"{where}: zero point is not 0 (TensorRT quantization is symmetric)")
        if n.op_type == "QuantizeLinear":
            bad = [c.op_type for c in consumers.get(n.output[0], []) if c.op_type != "DequantizeLinear"]
            if bad:
                problems.append(f"{where}: feeds {bad}, not a DequantizeLinear")
        elif n.input[0] in inits:
            if inits[n.input[0]].data_type == TensorProto.INT32:
                problems.append(f"{where}: int32 (bias) Q/DQ is not supported by TensorRT")
        elif producer.get(n.input[0]) is None or producer[n.input[0]].op_type != "QuantizeLinear":
            problems.append(f"{where}: input does not come from a QuantizeLinear")
    for n in g.node:
        if n.op_type in _WEIGHT_AXIS:
            problems += _weighted_op_problems(n, producer, inits)
    return problems


def _weighted_op_problems(n: Any, producer: dict[str, Any], inits: dict[str, Any]) -> list[str]:
    from onnx import numpy_helper

    widx, axis = _WEIGHT_AXIS[n.op_type]
    if n.op_type == "Gemm":
        trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
        axis = 0 if trans_b else 1
    w = producer.get(n.input[widx]) if len(n.input) > widx else None
    x = producer.get(n.input[0])
    w_dq = w is not None and w.op_type == "DequantizeLinear" and w.input[0] in inits
    x_dq = x is not None and x.op_type == "DequantizeLinear"
    where = f"{n.op_type} {n.name or n.output[0]}"
    if w_dq != x_dq and (w_dq or (x_dq and n.input[widx] in inits)):
        return [f"{where}: only one of its data/weight inputs is quantized, so TensorRT cannot run it in int8"]
    if not w_dq or w is None:
        return []
    scale = numpy_helper.to_array(inits[w.input[1]])
    rank = len(inits[w.input[0]].dims)
    if scale.size > 1:
        got = next((a.i for a in w.attribute if a.name == "axis"), 1)
        if got % rank != axis % rank:
            return [f"{where}: per-channel weight scales on axis {got}, TensorRT needs the output-channel axis "
                    f"{axis % rank}"]
    return []


def resolve_profiles(specs: list["InputSpec"], given: dict[str, Any], calibration: "CalibrationSet"
                     ) -> tuple[dict[str, dict[str, list[int]]], list[str]]:
    """TensorRT optimization profile per input with dynamic dims: {input: {min, opt, max}} (shapes).

    ``given`` maps a dim name to [min, opt, max]; a dim not given takes min 1 and opt/max from the data."""
    dims = {d for s in specs for d in s.shape if isinstance(d, str)}
    unknown = sorted(set(given) - dims)
    if unknown:
        raise ConfigError(f"--option profiles names {unknown}, which are not dynamic dimensions of the inputs",
                          f"dynamic dimensions: {sorted(dims) or 'none (every shape is fixed)'}",
                          "name the dims declared with --input, e.g. profiles={batch: [1, 8, 32]}")
    seen: dict[str, list[int]] = {d: [] for d in dims}
    for feed, _ in zip(calibration.calibration(), range(64)):
        for s in specs:
            for axis, d in s.dynamic_dims.items():
                seen[d].append(int(feed[s.name].shape[axis]))
    triples: dict[str, list[int]] = {}
    notes = []
    for d in sorted(dims):
        if d in given:
            t = given[d]
            if not (isinstance(t, list) and len(t) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                  for v in t)):
                raise ConfigError(f"profile for {d!r} must be [min, opt, max] integers", f"got {t!r}",
                                  f"e.g. --option 'profiles={{{d}: [1, 8, 32]}}'")
            if not 1 <= t[0] <= t[1] <= t[2]:
                raise ConfigError(f"profile for {d!r} must satisfy 1 <= min <= opt <= max", f"got {t}",
                                  "reorder the values")
            triples[d] = list(t)
        else:
            values = seen[d] or [1]
            opt = max(set(values), key=values.count)
            triples[d] = [1, opt, max(values)]
            notes.append(f"TensorRT profile for {d!r}: min 1, opt {opt}, max {max(values)} (from the data); set "
                         f"--option 'profiles={{{d}: [MIN, OPT, MAX]}}' for other sizes")
    profiles = {}
    for s in specs:
        if s.dynamic_dims:
            profiles[s.name] = {k: [triples[d][i] if isinstance(d, str) else d for d in s.shape]
                                for i, k in enumerate(("min", "opt", "max"))}
    return profiles, notes


def trtexec_args(trt_cfg: dict[str, Any], major: int) -> list[str]:
    """trtexec flags for this build (without --onnx/--saveEngine), for TensorRT ``major`` 10 or 11."""
    b = trt_cfg["builder"]
    args = [f"--memPoolSize=workspace:{b['workspace_mb']}"]
    for key, flag in (("min", "--minShapes"), ("opt", "--optShapes"), ("max", "--maxShapes")):
        if b["profiles"]:
            args.append(flag + "=" + ",".join(f"{name}:{'x'.join(str(v) for v in p[key])}"
                                              for name, p in b["profiles"].items()))
    if b["dla_core"] is not None:
        args.append(f"--useDLACore={b['dla_core']}")
        if b["gpu_fallback"]:
            args.append("--allowGPUFallback")
    if b["hardware_compatibility"] == "ampere+":
        args.append("--hardwareCompatibilityLevel=ampere+")
    if b["version_compatible"]:
        args.append("--versionCompatible")
    if major == 10:
        args += ["--int8"] if trt_cfg["int8_path"] == "implicit" else ["--stronglyTyped"]
    return args


def build_script(trt_cfg: dict[str, Any]) -> str:
    """``build_engine.sh``: the trtexec equivalent of the loader's engine build, for TensorRT 10 and 11."""
    from edgeexport import __version__

    implicit = trt_cfg["int8_path"] == "implicit"
    t10 = " ".join(shlex.quote(a) for a in trtexec_args(trt_cfg, 10))
    t11 = " ".join(shlex.quote(a) for a in trtexec_args(trt_cfg, 11))
    calib10 = ('  VINT=$(python3 -c \'import tensorrt as t; a, b, c = (t.__version__.split(".") + ["0", "0"])[:3]; '
               'print(int(a) * 10000 + int(b) * 100 + int(c))\' 2>/dev/null || true)\n'
               '  if [ -n "$VINT" ]; then sed "1s/.*/TRT-$VINT-EntropyCalibration2/" "$HERE/calibration.cache" '
               '> "$OUT.calib"; else cp "$HERE/calibration.cache" "$OUT.calib"; fi\n') if implicit else ""
    calib_arg = ' --calib="$OUT.calib"' if implicit else ""
    timing = ' --timingCacheFile="$OUT.timing"' if trt_cfg["builder"]["timing_cache"] else ""
    t11_line = ('  echo "this bundle uses implicit INT8 calibration, which TensorRT 11 removed: rebuild it with '
                '--option int8_path=explicit" >&2; exit 2 ;;' if implicit else
                f'  exec "$TRTEXEC" --onnx="$HERE/model.onnx" --saveEngine="$OUT"{timing} {t11} ;;')
    return f"""#!/bin/sh
# Build this bundle's TensorRT engine on the device with trtexec (written by edgeexport {__version__} from the
# same settings the loader builds with; 'python3 loader.py --selftest' builds, caches and checks it instead).
# Usage: sh build_engine.sh [OUT.plan]    env: TRTEXEC (trtexec path), TRT_MAJOR (10 or 11; default: detected)
# Then: python3 loader.py --engine-file OUT.plan --selftest
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
OUT="${{1:-model.plan}}"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
if [ -z "${{TRT_MAJOR:-}}" ]; then
  TRT_MAJOR=$(python3 -c 'import tensorrt; print(tensorrt.__version__.split(".")[0])' 2>/dev/null || true)
fi
case "${{TRT_MAJOR:-}}" in
10)
{calib10}  exec "$TRTEXEC" --onnx="$HERE/model.onnx" --saveEngine="$OUT"{timing} {t10}{calib_arg} ;;
11)
{t11_line}
"")
  echo "cannot tell the TensorRT version (no python3 tensorrt module): set TRT_MAJOR=10 or TRT_MAJOR=11" >&2; exit 2 ;;
*)
  echo "this bundle needs TensorRT {' or '.join(str(m) for m in trt_cfg['tensorrt_majors'])}; found $TRT_MAJOR" >&2; exit 2 ;;
esac
"""
