"""ONNX Runtime target: fp32, fp16, int8 dynamic, int8 static (QDQ, per-channel weights, real calibration) and
weight-only int8/int4 (MatMulNBits: weights in blocks with one scale each, activations float between layers)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional


from edgeexport import fusion
from edgeexport.errors import TargetError
from edgeexport.quantize import (check_names, preprocess, quantize_static, smooth_for_int8, to_fp16,
                                 wide_range_exclusions)
from edgeexport.recipes import record_integer_share
from edgeexport.reference import OnnxRunner
from edgeexport.targets.base import Artifact, Problem, Runner, Target, one_of
from edgeexport.util import quiet, sha256_file

if TYPE_CHECKING:  # pragma: no cover
    from edgeexport.calibration import CalibrationSet
    from edgeexport.config import BuildConfig
    from edgeexport.source import ModelSource

MODEL_FILE = "model.onnx"
#: --option device=NAME: the CPU the bundle will run on decides the int8 weight range. x86 CPUs without VNNI
#: multiply uint8 x int8 pairs with VPMADDUBSW, whose int16 pair sums saturate with full 8-bit weights, so ORT
#: recommends 7-bit weights there (reduce_range); VNNI (AVX-512 VNNI, AVX-VNNI), ARM64 (NEON, SDOT/I8MM) and GPUs
#: accumulate in int32 and lose nothing with 8 bits. 7 bits double every weight's rounding step: on
#: EfficientNet-Lite0 that cost 17 points of top-1 agreement (0.76 vs 0.93).
DEVICES: dict[str, tuple[bool, str]] = {
    "generic": (False, "8-bit weights (ARM64, x86 with VNNI, GPUs); use device=x86-avx2 for x86 CPUs without VNNI"),
    "arm64": (False, "ARM64 (NEON, SDOT/I8MM): int32 accumulation, 8-bit weights"),
    "x86-vnni": (False, "x86 with AVX-512 VNNI or AVX-VNNI: int32 accumulation, 8-bit weights"),
    "x86-avx2": (True, "x86 without VNNI (AVX2, AVX-512 without VNNI): 7-bit weights, since VPMADDUBSW's int16 "
                       "sums saturate with 8-bit ones"),
    "host": (False, "the machine that builds the bundle (for bundles built where they run): 7-bit weights if its "
                    "int8 kernels saturate, 8-bit otherwise"),
}
RECIPES = ("auto", "full", "weighted")
# target_options this target understands, with their defaults and a one-line meaning (shown in errors and docs)
OPTIONS: dict[str, tuple[Any, str]] = {
    "device": ("generic", f"the CPU the bundle runs on, which sets reduce_range: {', '.join(DEVICES)}"),
    "per_channel": (True, "per-channel weight scales (int8, int8-dynamic)"),
    "reduce_range": (None, "7-bit weights (true) or 8-bit (false); default: from device"),
    "activation_type": ("uint8", "int8 activation type: uint8 (asymmetric) or int8"),
    "recipe": ("auto", "int8: full (every op ORT quantizes), weighted (only Conv/Gemm/MatMul with constant weights, "
                       "their outputs float), auto (weighted for transformers, full otherwise)"),
    "smoothquant": ("auto", "int8, int8-dynamic: move activation outliers into the weights of constant-weight MatMuls "
                            "(SmoothQuant, strength chosen per tensor): auto (transformers), true, false"),
    "bias_correction": (True, "int8: subtract the mean shift that weight rounding causes from each Conv/Gemm bias"),
    "weight_rounding": ("gptq", "int8: gptq (round weights column by column, each error compensated by the columns "
                                "not yet rounded, from calibration inputs) or nearest"),
    "float_outputs": (True, "int8: leave the graph outputs (e.g. logits) unquantized"),
    "op_types": (None, "restrict quantization to these op types, e.g. [Conv, MatMul]"),
    "exclude_nodes": ([], "node names to keep in float"),
    "int16_tensors": ([], "int8: tensors whose activations are quantized to 16 bits (weights stay 8-bit)"),
    "wide_range_float": (True, "int8, int8-dynamic: keep float the layers whose input spans too many orders of "
                               "magnitude for one 8-bit range (most of its nonzero values would round to zero)"),
    "format": ("onnx", "onnx (model.onnx) or ort (ORT Mobile's model.ort, basic graph optimizations applied, with the "
                       "required_operators.config of a reduced onnxruntime build)"),
    "block_size": (32, "int4-weight, int8-weight: weights per scale block along the input dimension "
                       "(16, 32, 64, 128 or 256; smaller is more accurate and a little larger)"),
    "accuracy_level": (4, "int4-weight, int8-weight: MatMulNBits' compute: 4 quantizes each activation block to int8 "
                          "inside the kernel (fast on CPUs), 0 multiplies in float32"),
    "output_bits": (8, "int4-weight: bits of the layers that produce graph outputs (a decoder's lm_head), 8 or 4"),
    "embeddings": ("float", "int4-weight: the token-embedding table float, or int4 (GatherBlockQuantized: smaller "
                            "file, no decode-speed change, less accurate)"),
    "fusion": ("none", "fp32, fp16: transformer fusion into onnxruntime contrib ops (Attention, "
                       "EmbedLayerNormalization, BiasGelu) for GPU providers: auto (bert for transformer graphs), "
                       "bert, none (default: on CPUs the fused graph was no faster)"),
}
#: int8-dynamic leaves Conv float unless op_types asks for it: ConvInteger runs slower than float Conv on ORT's CPU
#: provider and loses accuracy (EfficientNet-Lite0: 0.27x eager, top-1 agreement 0.17)
DYNAMIC_OP_TYPES = ["MatMul", "Attention", "LSTM", "Gather", "EmbedLayerNormalization"]
#: weight-only precisions and their weight bits
WEIGHT_ONLY = {"int8-weight": 8, "int4-weight": 4}
#: below this share of the weights in MatMul/Gemm layers, a weight-only build is refused (a CNN whose only
#: MatMul is its classifier would ship "int4" with nearly every weight float)
MIN_WEIGHT_ONLY_SHARE = 0.5


class OrtTarget(Target):
    name = "ort"
    extra = ""
    precisions = ("fp32", "fp16", "int8-dynamic", "int8", "int8-weight", "int4-weight")
    description = "ONNX Runtime (CPU and any ORT execution provider)"
    precision_labels = {
        "int8-weight": "int8 weight-only (8-bit weight blocks in MatMulNBits; activations float between layers)",
        "int4-weight": "int4 weight-only (4-bit weight blocks in MatMulNBits; the output layer at 8 bits and the "
                       "token table float unless the options say otherwise; activations float between layers)",
    }
    options_spec = OPTIONS
    layer_search = True
    weight_only = "int8-dynamic"
    runtime_packages = ("onnxruntime",)
    decoder_precisions = ("fp32", "fp16", "int8-weight", "int4-weight", "int8-dynamic")

    def check(self, config: "BuildConfig") -> list[Problem]:
        problems = super().check(config)
        opts = config.target_options
        for key in ("per_channel", "reduce_range", "bias_correction", "float_outputs", "wide_range_float"):
            if key in opts and not isinstance(opts[key], bool):
                problems.append(Problem(f"target_options.{key}", f"{key} must be true or false", ""))
        if opts.get("activation_type", "uint8") not in ("uint8", "int8"):
            problems.append(Problem("target_options.activation_type", "activation_type must be uint8 or int8", ""))
        if not one_of(opts.get("smoothquant", "auto"), ("auto", True, False)):
            problems.append(Problem("target_options.smoothquant", "smoothquant must be auto, true or false", ""))
        if not one_of(opts.get("weight_rounding", "gptq"), ("gptq", "nearest")):
            problems.append(Problem("target_options.weight_rounding", "weight_rounding must be gptq or nearest", ""))
        if opts.get("device", "generic") not in DEVICES:
            problems.append(Problem("target_options.device", f"unknown device {opts['device']!r}",
                                    f"use one of {', '.join(DEVICES)}"))
        if opts.get("recipe", "auto") not in RECIPES:
            problems.append(Problem("target_options.recipe", f"unknown recipe {opts['recipe']!r}",
                                    f"use one of {', '.join(RECIPES)}"))
        if "smoothquant" in opts and config.precision not in ("int8", "int8-dynamic"):
            problems.append(Problem("target_options", f"smoothquant applies to --precision int8 and int8-dynamic only, "
                                    f"not {config.precision}", "drop it or use an int8 precision"))
        static_only = [k for k in ("recipe", "bias_correction", "weight_rounding", "float_outputs", "int16_tensors",
                                   "activation_type") if k in opts]
        if static_only and config.precision != "int8":
            problems.append(Problem("target_options", f"{', '.join(static_only)} apply to --precision int8 only, "
                                    f"not {config.precision}", "drop them or use --precision int8"))
        quant_only = [k for k in ("per_channel", "reduce_range", "device", "op_types", "exclude_nodes",
                                  "wide_range_float") if k in opts]
        if quant_only and config.precision not in ("int8", "int8-dynamic"):
            problems.append(Problem("target_options", f"{', '.join(quant_only)} apply to the int8 precisions only, "
                                    f"not {config.precision} (nothing is quantized)",
                                    "drop them or use --precision int8 / int8-dynamic"))
        if not one_of(opts.get("fusion", "none"), fusion.CHOICES):
            problems.append(Problem("target_options.fusion", "fusion must be auto, bert or none", ""))
        elif opts.get("fusion") == "bert" and config.precision not in ("fp32", "fp16"):
            problems.append(Problem("target_options", f"fusion=bert applies to --precision fp32 and fp16, not "
                                    f"{config.precision} (int8 quantizes the unfused graph)",
                                    "drop it or use --precision fp32 / fp16"))
        from edgeexport.weightonly import BLOCK_SIZES

        if opts.get("block_size", 32) not in BLOCK_SIZES or isinstance(opts.get("block_size"), bool):
            problems.append(Problem("target_options.block_size",
                                    f"block_size must be one of {', '.join(map(str, BLOCK_SIZES))}", ""))
        if opts.get("accuracy_level", 4) not in (0, 4) or isinstance(opts.get("accuracy_level"), bool):
            problems.append(Problem("target_options.accuracy_level", "accuracy_level must be 0 or 4", ""))
        if opts.get("output_bits", 8) not in (4, 8) or isinstance(opts.get("output_bits"), bool):
            problems.append(Problem("target_options.output_bits", "output_bits must be 4 or 8", ""))
        if opts.get("embeddings", "float") not in ("float", "int4"):
            problems.append(Problem("target_options.embeddings", "embeddings must be float or int4", ""))
        four_only = [k for k in ("output_bits", "embeddings") if k in opts]
        if four_only and config.precision != "int4-weight":
            problems.append(Problem("target_options", f"{', '.join(four_only)} apply to --precision int4-weight only, "
                                    f"not {config.precision}", "drop them or use --precision int4-weight"))
        weight_only = [k for k in ("block_size", "accuracy_level") if k in opts]
        if weight_only and config.precision not in WEIGHT_ONLY:
            problems.append(Problem("target_options", f"{', '.join(weight_only)} apply to --precision int4-weight "
                                    f"and int8-weight only, not {config.precision}",
                                    "drop them or use a weight-only precision"))
        if opts.get("format", "onnx") not in ("onnx", "ort"):
            problems.append(Problem("target_options.format", "format must be onnx or ort", ""))
        elif opts.get("format") == "ort" and (config.explain or config.accuracy_budget):
            problems.append(Problem("target_options.format", "--explain and --accuracy-budget read the Q/DQ ONNX "
                                    "graph; format=ort ships a flatbuffer", "find the mix with format=onnx, then "
                                    "build format=ort with the options it recorded"))
        for key in ("op_types", "exclude_nodes", "int16_tensors"):
            v = opts.get(key)
            if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                problems.append(Problem(f"target_options.{key}", f"{key} must be a list of strings", ""))
        return problems

    calib_methods = ("minmax", "percentile", "entropy")

    def trial_options(self, config: "BuildConfig") -> list[tuple[str, str, "BuildConfig"]]:
        opts = self.options(config)
        out = []
        if opts["reduce_range"]:
            out.append(("8-bit weights (right for ARM64, x86 with VNNI and GPUs)", "--option reduce_range=false",
                        config.model_copy(update={"target_options": {**config.target_options,
                                                                     "reduce_range": False}})))
        if config.precision == "int8-dynamic":
            static = {k: v for k, v in config.target_options.items() if k != "op_types"}
            out.append(("static int8 (calibrated activation ranges)", "--precision int8",
                        config.model_copy(update={"precision": "int8", "target_options": static})))
        return out

    def layer_fallback(self, config: "BuildConfig") -> str:
        return "" if config.precision == "int8" else "needs --precision int8 (a static Q/DQ graph; nodes are kept " \
            "in float through exclude_nodes)"

    def options(self, config: "BuildConfig") -> dict[str, Any]:
        opts = {k: config.target_options.get(k, default) for k, (default, _) in OPTIONS.items()}
        if opts["reduce_range"] is None and opts["device"] == "host":
            from edgeexport.bundle.loader import int8_saturation

            why = int8_saturation()
            opts["reduce_range"] = bool(why)
            opts["reduce_range_reason"] = (f"device=host: {why}: 7-bit weights" if why else "device=host: this "
                                           "machine's int8 kernels accumulate in int32 (or it cannot tell): 8-bit "
                                           "weights")
        elif opts["reduce_range"] is None:
            opts["reduce_range"], opts["reduce_range_reason"] = DEVICES[opts["device"]]
        else:
            opts["reduce_range_reason"] = "set by --option reduce_range"
        return opts

    def build(self, source: "ModelSource", config: "BuildConfig", calibration: "CalibrationSet", workdir: Path,
              onnx_path: Path) -> Artifact:
        out_dir = workdir / "ort"
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / MODEL_FILE
        opts = self.options(config)
        settings: dict[str, Any] = {"format": "onnx"}
        notes: list[str] = []
        if config.precision in ("fp32", "fp16"):
            fused = workdir / "fused.onnx"
            record = fusion.fuse(onnx_path, fused, opts["fusion"])
            settings.update(record)
            if record.get("fusion_reason", "").endswith("exported unfused"):
                notes.append(f"fusion: {record['fusion_reason']}")
            graph = fused if record["fusion"] != "none" else onnx_path
            if config.precision == "fp32":
                shutil.copyfile(graph, out)
            else:
                settings.update(to_fp16(graph, out))
        elif config.precision == "int8-dynamic":
            # constant-folded first: torch.onnx builds LSTM weights with Unsqueeze nodes, and onnxruntime's dynamic
            # quantizer silently leaves LSTMs whose weights are not initializers in float
            import onnx

            from edgeexport.recipes import family

            pre = workdir / "preprocessed.onnx"
            notes.extend(preprocess(onnx_path, pre))
            model = onnx.load(str(pre))
            check_names(model.graph, opts, dynamic=True)
            smoothed = smooth_for_int8(pre, calibration, opts["smoothquant"], family(model))
            wide, more, wide_record = wide_range_exclusions(pre, calibration, list(opts["op_types"] or DYNAMIC_OP_TYPES),
                                                            opts["wide_range_float"])
            notes.extend(more)
            settings.update(quantize_dynamic(pre, out, {**opts, "exclude_nodes": sorted(set(opts["exclude_nodes"]) |
                                                                                        set(wide))}))
            settings.update(smoothed, **wide_record)
        elif config.precision in WEIGHT_ONLY:
            from edgeexport.weightonly import quantize_weight_only

            record = quantize_weight_only(onnx_path, out, WEIGHT_ONLY[config.precision], opts["block_size"],
                                          accuracy_level=opts["accuracy_level"], output_bits=opts["output_bits"],
                                          embeddings=opts["embeddings"] == "int4")
            if not record["quantized_matmuls"] or record["covered_weight_share"] < MIN_WEIGHT_ONLY_SHARE:
                raise TargetError(
                    f"--precision {config.precision} would leave most of this model float",
                    f"weight-only quantization rewrites MatMul/Gemm layers with constant weights; they hold "
                    f"{record['covered_weight_share']:.0%} of this model's weights (convolutions and recurrent "
                    "layers are not covered), so the bundle would be weight-only in name only",
                    "use --precision int8 (static) or int8-dynamic for this model")
            settings.update(record)
        else:
            from edgeexport.recipes import shield_float_layers

            s, n = quantize_static(onnx_path, out, opts, config, calibration, workdir)
            settings.update(s)
            notes.extend(n)
            # layers left float must stay float at run time (onnxruntime would quantize them per tensor)
            settings["float_layers_shielded"] = shield_float_layers(out)
        import onnxruntime

        artifact = Artifact("ort", config.precision, out_dir, [MODEL_FILE], settings,
                            {"onnxruntime": onnxruntime.__version__}, notes)
        if config.precision == "int8":
            artifact.float_model = workdir / "preprocessed.onnx"
        if config.precision in ("int8", "int8-dynamic"):
            record_integer_share(artifact, workdir / "preprocessed.onnx", calibration)
            artifact.runtime_config["int8"] = {"weight_bits": 7 if opts["reduce_range"] else 8,
                                               "qdq": config.precision == "int8"}
            self._int8_kernels_here(artifact, workdir)
        if opts["format"] == "ort":
            artifact.files = to_ort_format(out, notes)
            settings.update(format="ort", ort_optimization_level="basic", onnx_sha256=sha256_file(out))
            out.unlink()
        return artifact

    def build_decoder(self, config: "BuildConfig", workdir: Path, onnx_path: Path) -> Artifact:
        """fp32, fp16 and weight-only go through build() (they read no data); int8-dynamic quantizes every
        constant-weight MatMul (Gemms split first), 8-bit per-channel, without the data-driven steps of build()."""
        if config.precision != "int8-dynamic":
            return self.build(None, config, None, workdir, onnx_path)  # type: ignore[arg-type]
        import onnx
        import onnxruntime
        from onnxruntime.quantization import QuantType
        from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

        from edgeexport.weightonly import gemm_to_matmul

        out_dir = workdir / "ort"
        out_dir.mkdir(parents=True, exist_ok=True)
        model = onnx.load(str(onnx_path))
        split = gemm_to_matmul(model)
        mid = workdir / "split.onnx"
        onnx.save(model, str(mid))
        with quiet():
            ort_quantize_dynamic(str(mid), str(out_dir / MODEL_FILE), op_types_to_quantize=["MatMul"],
                                 per_channel=True, reduce_range=False, weight_type=QuantType.QInt8)
        settings = {"format": "onnx", "quantization": "dynamic", "quantizer": "onnxruntime.quantization",
                    "op_types": ["MatMul"], "per_channel": True, "reduce_range": False, "gemms_split": split}
        return Artifact("ort", config.precision, out_dir, [MODEL_FILE], settings,
                        {"onnxruntime": onnxruntime.__version__}, [])

    @staticmethod
    def _exact_here(artifact: Artifact) -> bool:
        """Whether this machine runs a static Q/DQ ``artifact`` as written to validate it: its int8 kernels would
        saturate the 8-bit weights that the bundle's device multiplies exactly (the backend's int8_kernel_choice,
        which the device's loader runs too)."""
        from edgeexport.targets.ort.backend import int8_kernel_choice

        return int8_kernel_choice({"runtime_config": artifact.runtime_config, "precision": artifact.precision})[0]

    def _int8_kernels_here(self, artifact: Artifact, workdir: Path) -> None:
        """Validate what the bundle's device computes when this machine's int8 kernels would not compute it (x86
        without VNNI, 8-bit weights), and say so: a static Q/DQ graph runs as written, a dynamic one through a copy
        whose integer MatMuls/Convs sum exactly; this CPU's own kernels are timed for speed."""
        from edgeexport.bundle.loader import int8_saturation
        from edgeexport.quantize import exact_integer_graph

        why = int8_saturation() if artifact.runtime_config["int8"]["weight_bits"] == 8 else ""
        artifact.settings["build_machine_int8"] = why or "this machine's int8 kernels compute the Q/DQ graph exactly"
        if not why:
            return
        device = artifact.settings.get("device")
        if artifact.precision == "int8":
            artifact.validated_with = ("onnxruntime with the Q/DQ pairs run as written (the exact int8 arithmetic of "
                                       "the bundle's device, which accumulates in int32): " + why)
            on_device = "the loader runs the graph exactly (slower)"
        else:
            artifact.exact_model = workdir / "exact_integer.onnx"
            kept = exact_integer_graph(artifact.model_path, artifact.exact_model)
            artifact.validated_with = ("onnxruntime with the integer MatMuls summed exactly (as the bundle's device, "
                                       "which accumulates in int32, sums them): " + why +
                                       (f"; {', '.join(kept)} ran on this CPU's kernels" if kept else ""))
            on_device = "outputs there differ from the validated ones (the loader warns)"
        artifact.notes.append(f"{why}; the bundle's device ({device}) does not, so the build validates what the device "
                              f"computes and times this CPU's int8 kernels for speed only. On such a CPU {on_device}; "
                              "--option device=x86-avx2 builds 7-bit weights for it")

    def load(self, artifact: Artifact, threads: Optional[int] = None) -> Runner:
        if artifact.exact_model is not None:
            return OnnxRunner(str(artifact.exact_model), threads=threads, exact=True)
        exact = artifact.precision == "int8" and self._exact_here(artifact)
        return OnnxRunner(str(artifact.model_path), threads=threads, exact=exact)

    def load_for_timing(self, artifact: Artifact, threads: Optional[int] = None) -> Optional[Runner]:
        if artifact.exact_model is not None or (artifact.precision == "int8" and self._exact_here(artifact)):
            return OnnxRunner(str(artifact.model_path), threads=threads)  # this CPU's int8 kernels: speed only
        return None

    def requirements(self, artifact: Artifact) -> list[str]:
        major, minor = artifact.runtime["onnxruntime"].split(".")[:2]
        return ["numpy", f"onnxruntime>={major}.{minor}"]


ORT_FILE = "model.ort"
OPERATORS_FILE = "required_operators.config"


def to_ort_format(onnx_file: Path, notes: list[str]) -> list[str]:
    """ORT Mobile's format beside ``onnx_file``: onnxruntime's basic (provider-independent) graph optimizations,
    saved as a flatbuffer, and the operator (and type) list a reduced onnxruntime build needs. Returns the files."""
    import onnxruntime as ort

    ort_file = onnx_file.with_name(ORT_FILE)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # what every provider can take
    so.optimized_model_filepath = str(ort_file)
    so.add_session_config_entry("session.save_model_format", "ORT")
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(onnx_file), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise TargetError("onnxruntime cannot convert the model to the ORT format", str(e).strip()[:300],
                          "build with --option format=onnx") from None
    from onnxruntime.tools.ort_format_model import create_config_from_models

    config = onnx_file.with_name(OPERATORS_FILE)
    with quiet():
        try:
            create_config_from_models([ort_file], config, enable_type_reduction=True)
        except Exception as e:  # type reduction does not know every op: the operator list alone still works
            notes.append(f"ORT format: no per-type reduction in {OPERATORS_FILE} ({type(e).__name__}); it lists "
                         "the operators only")
            create_config_from_models([ort_file], config, enable_type_reduction=False)
    return [ORT_FILE, OPERATORS_FILE]


def quantize_dynamic(src: Path, dst: Path, opts: dict[str, Any]) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    with quiet():
        try:
            ort_quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=opts["per_channel"],
                                 reduce_range=opts["reduce_range"],
                                 op_types_to_quantize=opts["op_types"] or DYNAMIC_OP_TYPES,
                                 nodes_to_exclude=opts["exclude_nodes"])
        except Exception as e:
            raise TargetError("ONNX Runtime dynamic quantization failed", f"{type(e).__name__}: {e}",
                              "try --precision int8 (static) or exclude the failing op types") from None
    return {"quantization": "dynamic", "weight_type": "int8", "activations": "quantized at run time (uint8)",
            "per_channel": opts["per_channel"], "reduce_range": opts["reduce_range"], "device": opts["device"],
            "reduce_range_reason": opts["reduce_range_reason"],
            "op_types": opts["op_types"] or DYNAMIC_OP_TYPES,
            "exclude_nodes": opts["exclude_nodes"]}
