"""TFLite target: fp32, fp16, dynamic-range and full-integer int8, for phones and microcontroller-class devices.

ONNX -> onnx2tf -> SavedModel -> tf.lite.TFLiteConverter (TensorFlow 2.21), behind the ``[tflite]`` extra.
Names are honest: ``dynamic-range`` keeps float activations; ``int8`` is full-integer (every op quantized with the
shared calibration data, checked after conversion). onnx2tf turns channels-first inputs (NCW, NCHW, NCDHW)
channels-last; the manifest records the permutations and the loader hides them unless asked for the native layout.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import numpy as np

from edgeexport.errors import MissingOpsError, TargetError
from edgeexport.targets.base import (Artifact, CliOption, Problem, Runner, Target, TensorInfo, one_of,
                                     require_modules)
from edgeexport.targets.tflite import litert
from edgeexport.util import progress, quiet, strip_ansi, verbose

if TYPE_CHECKING:  # pragma: no cover
    from edgeexport.calibration import CalibrationSet
    from edgeexport.config import BuildConfig, InputSpec
    from edgeexport.source import ModelSource


def channels_last(rank: int) -> list[int]:
    """The permutation onnx2tf applies to a rank-``rank`` channels-first tensor: NCW -> NWC, NCHW -> NHWC, ..."""
    return [0, *range(2, rank), 1]


def channels_first(rank: int) -> list[int]:
    """The inverse of :func:`channels_last`: NWC -> NCW, NHWC -> NCHW, ..."""
    return [0, rank - 1, *range(1, rank - 1)]


def _require() -> None:
    _quiet_tensorflow()  # the first import of TensorFlow, with its C++ logs kept out of the terminal
    require_modules((("tensorflow", "tensorflow"), ("onnx2tf", "onnx2tf"), ("ai_edge_litert", "ai-edge-litert")),
                    "tflite", "the TFLite target")


class TfliteTarget(Target):
    name = "tflite"
    extra = "tflite"
    build_imports = ("onnx2tf", "tensorflow")
    calib_methods = ("minmax", "percentile")  # minmax: the converter's own; percentile: ranges narrowed for it
    precisions = ("fp32", "fp16", "dynamic-range", "int8")
    description = "TFLite / LiteRT (.tflite) for Android, iOS, Linux SBCs and microcontrollers"
    precision_labels = {"fp16": "fp16 (float16 weights, float32 compute on CPU; GPU delegates may run fp16)",
                        "int8": "int8 full-integer (int8 weights and activations, every op quantized)"}
    weight_only = "dynamic-range"
    runtime_packages = ("ai-edge-litert", "tensorflow")
    decoder_refusal = ("TFLite has no growing KV cache: onnx2tf and litert-torch convert static graphs, and a "
                       "decoder's cache grows each step (a fixed-size cache with an update index is not built yet)")
    cli_options = (CliOption("--io-dtype", "io_dtype", "tflite int8: dtype of the model's inputs/outputs (int8/uint8 "
                             "for accelerators, MCUs).", ("float32", "int8", "uint8")),)
    options_spec = {"io_dtype": ("float32", "int8 only: dtype of the model's inputs/outputs (float32, int8, uint8)"),
                    "bias_correction": (True, "int8: subtract the mean shift that weight rounding causes from each "
                                              "Conv/Gemm bias (before conversion)"),
                    "weight_rounding": ("gptq", "int8: gptq (round weights column by column, each error compensated "
                                                "by the columns not yet rounded, from calibration inputs; the "
                                                "converter finds the same integers) or nearest"),
                    "converter": ("auto", "onnx2tf (ONNX -> SavedModel -> TFLiteConverter), litert-torch (PyTorch -> "
                                          "torch.export -> .tflite; fp32, fp16, dynamic-range) or auto (onnx2tf, "
                                          "then litert-torch where onnx2tf cannot convert the graph)")}

    def check(self, config: "BuildConfig") -> list[Problem]:
        problems = super().check(config)
        if config.precision == "int8-dynamic":
            problems[-1].fix = "TFLite calls weight-only int8 'dynamic-range': use --precision dynamic-range"
        io = config.target_options.get("io_dtype", "float32")
        if not isinstance(config.target_options.get("bias_correction", True), bool):
            problems.append(Problem("target_options.bias_correction", "bias_correction must be true or false", ""))
        elif "bias_correction" in config.target_options and config.precision != "int8":
            problems.append(Problem("target_options.bias_correction", "bias_correction applies to --precision int8",
                                    "drop it or use --precision int8"))
        if not one_of(config.target_options.get("weight_rounding", "gptq"), ("gptq", "nearest")):
            problems.append(Problem("target_options.weight_rounding", "weight_rounding must be gptq or nearest", ""))
        elif "weight_rounding" in config.target_options and config.precision != "int8":
            problems.append(Problem("target_options.weight_rounding", "weight_rounding applies to --precision int8",
                                    "drop it or use --precision int8"))
        converter = config.target_options.get("converter", "auto")
        if not one_of(converter, ("auto", "onnx2tf", "litert-torch")):
            problems.append(Problem("target_options.converter", "converter must be auto, onnx2tf or litert-torch", ""))
        elif converter == "litert-torch":
            if config.precision in litert.REFUSED:
                problems.append(Problem("target_options.converter", litert.REFUSED[config.precision],
                                        "use --option converter=onnx2tf for full-integer int8, or "
                                        "--precision dynamic-range with litert-torch"))
            onnx2tf_only = [k for k in ("io_dtype", "bias_correction", "weight_rounding")
                            if k in config.target_options]
            if onnx2tf_only:
                problems.append(Problem("target_options", f"{', '.join(onnx2tf_only)} apply to the onnx2tf converter",
                                        "drop them, or use --option converter=onnx2tf"))
        if io not in ("float32", "int8", "uint8"):
            problems.append(Problem("target_options.io_dtype", f"io_dtype must be float32, int8 or uint8, not {io!r}", ""))
        elif io != "float32" and config.precision != "int8":
            problems.append(Problem("target_options.io_dtype", f"io_dtype {io} needs --precision int8 (full-integer)",
                                    "drop --io-dtype or use --precision int8"))
        return problems

    def layer_fallback(self, config: "BuildConfig") -> str:
        return ("not supported for TFLite: the converter quantizes the whole graph from the SavedModel and exposes no "
                "per-node float fallback that this tool can drive and validate; use --target ort or trt for a "
                "per-layer int8/float mix, or --precision dynamic-range (float activations) for TFLite")

    def check_inputs(self, specs: list["InputSpec"], max_length: int = 128) -> list[Problem]:
        def fixed(spec: "InputSpec", i: int, d: Any) -> int:
            if isinstance(d, int):
                return d
            # token ids and masks: the length the text is padded to (--max-length), not 1; batch and the rest: 1
            return max_length if spec.dtype.startswith("int") and i > 0 and not d.startswith("batch") else 1

        return [Problem(f"inputs.{s.name}", f"TFLite needs static shapes; {s.describe()} has dynamic dims",
                        f"fix them with --input {s.name}:{'x'.join(str(fixed(s, i, d)) for i, d in enumerate(s.shape))}"
                        f":{s.dtype}")
                for s in specs if s.dynamic_dims]

    def build(self, source: "ModelSource", config: "BuildConfig", calibration: "CalibrationSet", workdir: Path,
              onnx_path: Path) -> Artifact:
        _require()
        converter = config.target_options.get("converter", "auto")
        if converter == "litert-torch":
            return self._build_litert(source, config, calibration, workdir, onnx_path, [])
        try:
            return self._build_onnx2tf(config, calibration, workdir, onnx_path)
        except MissingOpsError:
            raise
        except TargetError as e:
            if converter != "auto" or not e.what.startswith("onnx2tf"):
                raise
            module = source.torch_module(config.inputs, _output_names(onnx_path))
            why = litert.unavailable(config.precision, module)
            if why:
                raise TargetError(e.what, e.why, f"{e.fix}; the other converter, litert-torch, cannot: {why}") from None
            note = (f"onnx2tf could not convert the graph ({e.what}: {e.why[:200]}); converted with litert-torch "
                    "instead (--option converter=litert-torch says so up front)")
            return self._build_litert(source, config, calibration, workdir, onnx_path, [note], module)

    def _build_litert(self, source: "ModelSource", config: "BuildConfig", calibration: "CalibrationSet",
                      workdir: Path, onnx_path: Path, notes: list[str], module: Any = None) -> Artifact:
        names = _output_names(onnx_path)
        module = module if module is not None else source.torch_module(config.inputs, names)
        why = litert.unavailable(config.precision, module)
        if why:
            raise TargetError(f"--target tflite cannot use litert-torch for {config.precision}", why,
                              "use --option converter=onnx2tf, or install it" if "not installed" in why
                              else "use --option converter=onnx2tf, or --target ort")
        out_dir = workdir / "tflite-litert"
        out_dir.mkdir(parents=True, exist_ok=True)
        name = f"model_{config.precision}.tflite"
        settings: dict[str, Any] = {"format": "tflite"}
        converted, io = litert.convert(module, config.inputs, names, calibration, config.precision, out_dir / name)
        settings.update(converted)
        settings.update(inspect_tflite(out_dir / name, config.precision))
        if io["narrowed"]:
            notes.append("the .tflite takes " + ", ".join(f"{k} as {v}" for k, v in io["narrowed"].items())
                         + " (litert-torch narrows int64); the loader casts, and refuses values that do not fit")
        runtime_config = {"input_perm": {}, "output_perm": {}, "native_inputs": io["native_inputs"],
                          "native_outputs": io["native_outputs"], "signature": io["signature"]}
        return Artifact("tflite", config.precision, out_dir, [name], settings,
                        {"ai-edge-litert": _version("ai-edge-litert")}, notes, runtime_config)

    def _build_onnx2tf(self, config: "BuildConfig", calibration: "CalibrationSet", workdir: Path,
                       onnx_path: Path) -> Artifact:
        out_dir = workdir / "tflite"
        io = config.target_options.get("io_dtype", "float32")
        name = f"model_{config.precision}.tflite"
        notes = []
        corrected: dict[str, Any] = {}
        if config.precision == "int8":
            import onnx

            from edgeexport import recipes

            model = onnx.load(str(onnx_path))
            requested = config.calibration.method
            method = recipes.calib_method(requested, recipes.family(model))
            config = config.model_copy(update={"calibration": config.calibration.model_copy(update={"method": method})})
            corrected = {"calibration_method": method, "calibration_method_requested": requested,
                         "calibration_samples": len(calibration.calib_idx)}
            if method == "percentile":
                corrected["percentile"] = config.calibration.percentile
            onnx_path, done = _corrected(onnx_path, model, calibration, workdir,
                                         config.target_options.get("bias_correction", True),
                                         config.target_options.get("weight_rounding", "gptq"))
            corrected.update(done)
        try:
            data, in_perm, out_perm, native_in, native_out = _convert_once(onnx_path, config, calibration, out_dir, io,
                                                                           record=corrected)
        except MissingOpsError as e:
            missing = list(e.missing_ops)
            pseudo = [op for op in missing if op in _PSEUDO_OPS]
            if not pseudo or len(pseudo) != len(missing):
                raise
            # e.g. exact GELU lowers to Erf, which has no TFLite builtin: onnx2tf can rebuild it from builtins
            notes.append(f"TFLite has no builtin for {', '.join(pseudo)}; onnx2tf rebuilt it from builtin ops "
                         "(an approximation, measured by the validation below)")
            data, in_perm, out_perm, native_in, native_out = _convert_once(
                onnx_path, config, calibration, workdir / "tflite-pseudo", io, pseudo, record=corrected)
            out_dir = workdir / "tflite-pseudo"
        (out_dir / name).write_bytes(data)
        settings = {"format": "tflite", "converter": f"onnx2tf {_version('onnx2tf')} -> SavedModel -> "
                    f"TFLiteConverter (tensorflow {_version('tensorflow')})", "io_dtype": io}
        settings.update(corrected)
        if "calibration_fallback" in corrected:
            notes.append(corrected["calibration_fallback"])
        settings.update(inspect_tflite(out_dir / name, config.precision))
        if in_perm:
            shapes = {i["name"]: i["shape"] for i in native_in}
            notes.append(f"the .tflite takes its inputs channels-last ({', '.join(f'{k}: {shapes[k]}' for k in in_perm)}); "
                         "the loader transposes from the model's layout (load(..., layout='native') skips it)")
        runtime_config = {"input_perm": in_perm, "output_perm": out_perm, "native_inputs": native_in,
                          "native_outputs": native_out}
        return Artifact("tflite", config.precision, out_dir, [name], settings,
                        {"ai-edge-litert": _version("ai-edge-litert")}, notes, runtime_config)

    def load(self, artifact: Artifact, threads: Optional[int] = None) -> Runner:
        return TfliteRunner(artifact, threads)

    def requirements(self, artifact: Artifact) -> list[str]:
        major, minor = artifact.runtime["ai-edge-litert"].split(".")[:2]
        return ["numpy", f"ai-edge-litert>={major}.{minor}"]


def _corrected(onnx_path: Path, model: Any, calibration: "CalibrationSet", workdir: Path, bias_correction: bool,
               rounding: str) -> tuple[Path, dict[str, Any]]:
    """The ONNX with its weights already on the grid TFLite's int8 weights use (symmetric, per output channel,
    [-127, 127]), rounded by GPTQ (``rounding='gptq'``), and/or each Conv/Gemm bias corrected for that rounding. The
    converter quantizes what it is given and finds the same integers, so the work goes in before conversion."""
    from edgeexport import gptq, recipes

    path, done = recipes.correct_weights(onnx_path, workdir / "tflite_corrected.onnx", recipes.rounded_weights(model),
                                         gptq.max_abs_grids(model), calibration, bias_correction, rounding)
    if bias_correction:
        done["bias_correction"] = ("dW . E[x] subtracted from each bias before conversion (dW: the difference "
                                   "between the weights TFLite will hold and the float ones)"
                                   if done["bias_corrected_layers"] else "no Conv/Gemm with a bias")
    return path, done


def _quiet_tensorflow() -> None:
    """TensorFlow's C++ logs (about 35 lines a build, an E0000 cuInit error among them on a machine without a GPU)
    stay out of the terminal unless --verbose; set before TensorFlow is first imported."""
    import os

    if not verbose():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        with quiet():  # the first import prints XLA's device probing through the C++ logger
            import tensorflow  # noqa: F401
    except ImportError:  # require_modules names the extra that brings it
        pass


_PSEUDO_OPS = {"Erf": "erf", "Gelu": "gelu", "Asin": "asin", "Acos": "acos", "Atan": "atan"}  # onnx2tf wants lowercase


def _convert_once(onnx_path: Path, config: "BuildConfig", calibration: "CalibrationSet", out_dir: Path, io: str,
                  pseudo: Optional[list[str]] = None, record: Optional[dict[str, Any]] = None):
    out_dir.mkdir(parents=True, exist_ok=True)
    saved_model = to_saved_model(onnx_path, config.inputs, out_dir, calibration, [_PSEUDO_OPS[p] for p in pseudo or []])
    in_perm, out_perm, native_in, native_out = layouts(saved_model, config.inputs, onnx_path)
    return convert(saved_model, config, calibration, in_perm, io, record), in_perm, out_perm, native_in, native_out


def _output_names(onnx_path: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(onnx_path), load_external_data=False).graph.output]


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "0"


def to_saved_model(onnx_path: Path, specs: list["InputSpec"], out_dir: Path, calibration: "CalibrationSet",
                   pseudo: Optional[list[str]] = None) -> Path:
    """onnx2tf on a *copy* (it rewrites its input in place). 3- to 5-D inputs become channels-last; `layouts` checks the rest.

    (Forcing NCW on 3-D inputs with keep_ncw_or_nchw_or_ncdhw_input_names gave wrong numbers on a transformer
    here; onnx2tf's own choice validated, so it is left to decide.)"""
    _quiet_tensorflow()
    import onnx2tf

    src = out_dir / "input_copy.onnx"
    shutil.copyfile(onnx_path, src)
    saved_model = out_dir / "saved_model"
    _offline_sample_data(out_dir, specs, calibration)
    with quiet() as log, contextlib.chdir(out_dir):
        try:
            onnx2tf.convert(input_onnx_file_path=str(src), output_folder_path=str(saved_model), verbosity="debug",
                            copy_onnx_input_output_names_to_tflite=True,
                            replace_to_pseudo_operators=pseudo or None)
        except BaseException as e:  # onnx2tf calls sys.exit on some failures
            text = strip_ansi(log.getvalue())
            last = [ln for ln in text.splitlines() if "onnx_op_type:" in ln][-1:]  # the op being converted
            where = ""
            if last:
                m = re.search(r"onnx_op_type:\s*(\S+)\s+onnx_op_name:\s*(\S+)", last[0])
                where = f"at ONNX op {m.group(1)} (node {m.group(2)}): " if m else ""
            raise TargetError("onnx2tf could not convert the model to TensorFlow",
                              where + f"{type(e).__name__}: {' '.join(str(e).split())[:300]}",
                              "try --option converter=litert-torch (PyTorch models), another --opset, or simplify "
                              "that part of the model; --target ort runs it") from None
    if not (saved_model / "saved_model.pb").is_file():
        raise TargetError("onnx2tf did not write a SavedModel", log.getvalue()[-300:], "use --target ort")
    return saved_model


_ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"


def _offline_sample_data(out_dir: Path, specs: list["InputSpec"], calibration: "CalibrationSet") -> None:
    """onnx2tf fetches sample images from the internet for 3-channel image inputs unless a file of that name is in
    the working directory. Give it 20 of *our* calibration images instead (NHWC, resized to 128x128)."""
    images = [s for s in specs if len(s.shape) == 4 and 3 in (s.shape[1], s.shape[3])]
    if not images:
        return
    spec = images[0]
    feeds = [f[spec.name][0] for f, _ in zip(calibration.calibration(), range(20))]
    arr = np.stack(feeds).astype(np.float32)
    if arr.shape[1] == 3:
        arr = arr.transpose(0, 2, 3, 1)
    rows = np.linspace(0, arr.shape[1] - 1, 128).round().astype(int)
    cols = np.linspace(0, arr.shape[2] - 1, 128).round().astype(int)
    arr = arr[:, rows][:, :, cols]
    arr = np.concatenate([arr] * (20 // len(arr) + 1))[:20]
    np.save(out_dir / _ONNX2TF_SAMPLE, arr)


def _signature(saved_model: Path) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    _quiet_tensorflow()
    import tensorflow as tf

    with quiet():
        fn = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    ins = {k: [int(d) for d in v.shape] for k, v in fn.structured_input_signature[1].items()}
    outs = {k: [int(d) for d in v.shape] for k, v in fn.structured_outputs.items()}
    return ins, outs


def layouts(saved_model: Path, specs: list["InputSpec"], onnx_path: Path):
    """Permutations model-layout -> TFLite layout (inputs) and back (outputs), and the native I/O metadata."""
    import onnx

    sig_in, sig_out = _signature(saved_model)
    in_perm, native_in = {}, []
    for s in specs:
        got = sig_in.get(s.name)
        if got is None:
            raise TargetError(f"the SavedModel lost input {s.name!r}", f"it has {sorted(sig_in)}", "use --target ort")
        if got != s.shape:
            rank = len(s.shape)
            if rank >= 3 and got == [s.shape[i] for i in channels_last(rank)]:
                in_perm[s.name] = channels_last(rank)
            else:
                raise TargetError(f"input {s.name!r} became {got} in TFLite (model: {s.shape})", "unknown layout change",
                                  "use --target ort")
        native_in.append({"name": s.name, "shape": got, "dtype": s.dtype})
    graph = onnx.load(str(onnx_path)).graph
    out_perm, native_out = {}, []
    for o in graph.output:
        want = [d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim]
        got = sig_out.get(o.name)
        if got is None:
            raise TargetError(f"the SavedModel lost output {o.name!r}", f"it has {sorted(sig_out)}", "use --target ort")
        if len(want) >= 3 and got != want and got == [want[i] for i in channels_last(len(want))]:
            out_perm[o.name] = channels_first(len(want))
        native_out.append({"name": o.name, "shape": got, "dtype": "float32"})
    return in_perm, out_perm, native_in, native_out


def convert(saved_model: Path, config: "BuildConfig", calibration: "CalibrationSet", in_perm: dict,
            io: str, record: Optional[dict[str, Any]] = None) -> bytes:
    """The .tflite bytes; what the int8 calibration did goes into ``record`` (for the manifest)."""
    _quiet_tensorflow()
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if config.precision == "fp16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif config.precision == "dynamic-range":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    elif config.precision == "int8":
        n = len(calibration.calib_idx)

        def representative():
            for feed in progress(calibration.calibration(), f"calibrating ({n} samples)", total=n):
                yield {k: (np.transpose(v, in_perm[k]) if k in in_perm else v) for k, v in feed.items()}

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if config.calibration.method == "percentile":
            _clip_ranges_before_quantizing(conv, lambda: (
                {k: (np.transpose(v, in_perm[k]) if k in in_perm else v) for k, v in feed.items()}
                for feed in progress(calibration.calibration(), f"percentile ranges ({n} samples)", total=n)),
                config.calibration.percentile,
                {} if record is None else record)
        if io != "float32":
            conv.inference_input_type = getattr(tf, io)
            conv.inference_output_type = getattr(tf, io)
    with quiet() as log:
        try:
            return conv.convert()
        except Exception as e:
            hint = ("an op has no int8 kernel: try --precision dynamic-range or fp16"
                    if config.precision == "int8" else "rewrite the op named above with standard ops, or use --target ort")
            missing = re.findall(r"'tf\.(\w+)' op is neither a custom op nor a flex op", str(e))
            if missing:
                raise MissingOpsError(f"TFLite has no builtin op for {', '.join(sorted(set(missing)))}",
                                      f"TFLiteConverter ({config.precision}): '{missing[0]}' is neither a builtin, "
                                      "custom nor flex op", hint, missing_ops=tuple(sorted(set(missing)))) from None
            raise TargetError(f"TFLiteConverter failed ({config.precision})", f"{type(e).__name__}: {str(e)[:400]}"
                              + (f" | {log.getvalue().strip()[-200:]}" if log.getvalue().strip() else ""), hint) from None


HISTOGRAM_BINS = 2048  # as onnxruntime's histogram calibrators


def _clip_ranges_before_quantizing(conv: Any, feeds: Any, percentile: float, record: dict[str, Any]) -> None:
    """Make ``conv`` quantize from percentile ranges instead of min/max: between its calibration (which records
    each tensor's min/max in the float model) and its quantization, each range is narrowed to the values between
    the ``(100 - percentile) / 2`` % lowest and highest ones over the calibration set (two-sided, as
    onnxruntime's percentile calibrator), from a histogram over the recorded min/max. The converter's own
    quantizer then runs unchanged. TensorFlow's converter has no public hook between the two steps: this wraps
    its ``_quantize`` (TensorFlow 2.21, pinned by onnx2tf)."""
    from tensorflow.lite.python.convert import mlir_quantize
    from tensorflow.lite.tools import flatbuffer_utils

    calibrate = conv._quantize

    def quantize(result, input_type, output_type, activations_type, bias_type, allow_float,
                 enable_variable_quantization, debug_options):
        conv._experimental_calibrate_only = True
        try:
            calibrated = calibrate(result, input_type, output_type, activations_type, bias_type, allow_float,
                                   enable_variable_quantization, debug_options)
        finally:
            conv._experimental_calibrate_only = False
        model = flatbuffer_utils.convert_bytearray_to_object(calibrated)
        try:
            narrowed = percentile_ranges(bytes(calibrated), model, feeds(), percentile)
        except Exception as e:  # e.g. an op the interpreter cannot run outside the converter: keep min/max, say so
            narrowed = 0
            record["calibration_method"] = "minmax"
            record["calibration_fallback"] = (f"percentile ranges could not be measured ({type(e).__name__}: "
                                              f"{str(e)[:160]}); the converter's min/max ranges were used")
        record["percentile_ranges_narrowed"] = narrowed
        if narrowed:
            calibrated = flatbuffer_utils.convert_object_to_bytearray(model)
        return mlir_quantize(
            calibrated, conv._experimental_disable_per_channel, input_data_type=input_type,
            output_data_type=output_type, enable_variable_quantization=enable_variable_quantization,
            disable_per_channel_for_dense_layers=conv._experimental_disable_per_channel_quantization_for_dense_layers,
            debug_options_str=debug_options.SerializeToString())

    conv._quantize = quantize


def percentile_ranges(calibrated: bytes, model: Any, feeds: Any, percentile: float) -> int:
    """Narrow the min/max recorded on the tensors of ``model`` (the converter's calibrated float model, as an
    object; ``calibrated`` its bytes) to two-sided percentiles over ``feeds``. Returns how many were narrowed."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    graph = model.subgraphs[0]
    ranged = {i: (float(t.quantization.min[0]), float(t.quantization.max[0])) for i, t in enumerate(graph.tensors)
              if t.quantization is not None and t.quantization.min is not None and len(t.quantization.min) == 1
              and t.quantization.max is not None and float(t.quantization.max[0]) > float(t.quantization.min[0])}
    if not ranged:
        return 0
    interp = Interpreter(model_content=calibrated, experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    runner = interp.get_signature_runner()
    hist = {i: np.zeros(HISTOGRAM_BINS, np.int64) for i in ranged}
    for feed in feeds:
        runner(**feed)
        for i, (lo, hi) in ranged.items():
            v = np.asarray(interp.get_tensor(i), dtype=np.float64).reshape(-1)
            bins = np.clip(((v - lo) * (HISTOGRAM_BINS / (hi - lo))).astype(np.int64), 0, HISTOGRAM_BINS - 1)
            hist[i] += np.bincount(bins, minlength=HISTOGRAM_BINS)
    cut = (100.0 - percentile) / 200.0
    narrowed = 0
    for i, (lo, hi) in ranged.items():
        cdf = np.cumsum(hist[i]) / max(int(hist[i].sum()), 1)
        width = (hi - lo) / HISTOGRAM_BINS
        new_lo = lo + width * int(np.searchsorted(cdf, cut))  # >= lo
        if lo <= 0:
            new_lo = min(new_lo, 0.0)  # a range that held zero keeps it
        new_hi = min(hi, lo + width * (int(np.searchsorted(cdf, 1.0 - cut)) + 1))
        if new_hi > new_lo and (new_lo > lo or new_hi < hi):
            q = graph.tensors[i].quantization
            q.min, q.max = [new_lo], [new_hi]
            narrowed += 1
    return narrowed


def inspect_tflite(path: Path, precision: str) -> dict[str, Any]:
    """What the file really holds: the dtypes of activations (tensors some op produces) and of constants.
    A full-integer int8 file must have no float activation except its float I/O, if asked for."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # without the default XNNPACK delegate, so every op (and every tensor it produces) stays visible
    interp = Interpreter(model_path=str(path),
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    dtypes = {d["index"]: np.dtype(d["dtype"]) for d in interp.get_tensor_details()}
    names = {d["index"]: d["name"] for d in interp.get_tensor_details()}
    ops = interp._get_ops_details()
    sig = interp.get_signature_runner()
    io_idx = {d["index"] for d in list(sig.get_input_details().values()) + list(sig.get_output_details().values())}
    produced = {int(i) for op in ops for i in op["outputs"]}
    consumed = {int(i) for op in ops for i in op["inputs"] if i >= 0}
    activations = produced - io_idx
    constants = consumed - produced - io_idx
    info = {"activation_dtypes": sorted({dtypes[i].name for i in activations}),
            "constant_dtypes": sorted({dtypes[i].name for i in constants}),
            "ops": sorted({op["op_name"] for op in ops})}
    if precision == "int8":
        floats = [names[i] for i in activations if dtypes[i].kind == "f"]
        if floats:
            raise TargetError("the int8 .tflite is not full-integer", f"float activations remain: {floats[:5]}",
                              "use --precision dynamic-range, or --target ort")
    return info


class TfliteRunner(Runner):
    """Build-time runner: the very backend the bundle's loader ships (backend.py in this unit)."""

    def __init__(self, artifact: Artifact, threads: Optional[int] = None) -> None:
        from edgeexport.targets.tflite.backend import TfliteBackend

        manifest = {"runtime_config": artifact.runtime_config}
        self.backend = TfliteBackend(artifact.model_path, manifest, threads=threads)
        native = {d["name"]: d for d in artifact.runtime_config["native_inputs"]}
        inv = {k: list(np.argsort(v)) for k, v in artifact.runtime_config["input_perm"].items()}
        self.inputs = [TensorInfo(n, [d["shape"][i] for i in inv[n]] if n in inv else d["shape"], d["dtype"])
                       for n, d in native.items()]
        self.outputs = [TensorInfo(d["name"], d["shape"], d["dtype"]) for d in artifact.runtime_config["native_outputs"]]

    def _infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.backend.run(dict(feeds))
