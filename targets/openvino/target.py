"""OpenVINO target: fp32, fp16 and int8 IR for Intel CPUs, iGPUs and NPUs, behind the ``[openvino]`` extra.

ONNX -> ``openvino.convert_model`` -> IR (model.xml + model.bin). fp16 compresses the weights to float16 (the CPU
computes in float32; GPU and NPU plugins compute in fp16). int8 is NNCF's post-training quantization, OpenVINO's
own: FakeQuantize on activations and weights from the shared calibration split, fast bias correction, and NNCF's
transformer scheme for attention graphs. The compute precision is recorded and pinned for the device's CPU plugin,
which would otherwise pick bfloat16 on CPUs that have it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import numpy as np

from edgeexport.errors import TargetError
from edgeexport.targets.base import Artifact, Problem, Runner, Target, TensorInfo, one_of, require_modules
from edgeexport.util import quiet

if TYPE_CHECKING:  # pragma: no cover
    from edgeexport.calibration import CalibrationSet
    from edgeexport.config import BuildConfig
    from edgeexport.source import ModelSource

MODEL_FILE, WEIGHTS_FILE = "model.xml", "model.bin"
OPTIONS: dict[str, tuple[Any, str]] = {
    "quantizer": ("auto", "int8: nncf (OpenVINO's own post-training quantization) or qdq (edgeexport's Q/DQ recipe: "
                          "calibrated ranges, GPTQ weights, bias correction; OpenVINO runs the Q/DQ pairs as int8); "
                          "auto: qdq for CNNs, nncf for transformers (the better of the two on each, measured)"),
    "model_type": ("auto", "int8: transformer (NNCF's transformer scheme: attention kept accurate) or cnn; auto "
                           "from the graph"),
    "preset": ("auto", "int8: performance (symmetric activations) or mixed (asymmetric activations, better for "
                       "non-ReLU ranges); auto: NNCF's default for the model type"),
    "activation_ranges": ("auto", "int8: how NNCF sets each activation range from the calibration samples: minmax "
                                  "(over all samples), mean_minmax (the mean of each sample's min and max: clips "
                                  "the rarer peaks), histogram (NNCF's optimum from a histogram); auto: mean_minmax, "
                                  "NNCF's default (minmax with --calib-method minmax)"),
    "fast_bias_correction": (True, "int8: correct each layer's output mean for its quantization (NNCF)"),
    "ignored_nodes": ([], "int8: node names kept in float (nncf: the IR's names, its ignored scope; qdq: the "
                          "ONNX graph's names)"),
}
#: nncf-only and qdq-only options
NNCF_ONLY = ("model_type", "preset", "activation_ranges", "fast_bias_correction")
#: the Q/DQ recipe's settings for OpenVINO (the shared recipe's options, as the ort target names them)
QDQ_OPTIONS: dict[str, Any] = {
    "per_channel": True, "reduce_range": False, "device": "openvino", "activation_type": "uint8", "recipe": "auto",
    "smoothquant": "auto", "bias_correction": True, "weight_rounding": "gptq", "float_outputs": True,
    "op_types": None, "int16_tensors": [],
    "reduce_range_reason": "8-bit weights: OpenVINO's int8 CPU kernels (VNNI, AMX), GPU and NPU; x86 CPUs without "
                           "VNNI may saturate 8-bit products: use --option quantizer=nncf for those (its overflow fix)"}
_NNCF_METHOD = ("--calib-method {} is not an NNCF range estimator: NNCF takes minmax, or --option "
                "activation_ranges=minmax|mean_minmax|histogram")
RANGES = ("minmax", "mean_minmax", "histogram")
#: the IR ops that carry weights (where the multiply-adds are), and their names in the CPU plugin's runtime graph
WEIGHTED_OPS = ("Convolution", "GroupConvolution", "MatMul", "LSTMSequence", "GRUSequence", "RNNSequence")
#: where each weighted op's weight enters (a recurrent sequence op: X, H0, (C0,) lengths, W, R, B)
WEIGHT_INPUT = {"LSTMSequence": 4, "GRUSequence": 3, "RNNSequence": 3}
RUNTIME_WEIGHTED = ("Convolution", "FullyConnected", "MatMul", "GroupConvolution")
INTEGER = ("u8", "i8")


def _convert(path: Path, what: str, fix: str = "report the op it names; --target ort runs every ONNX op") -> Any:
    """``openvino.convert_model`` on an ONNX file, its failure a TargetError."""
    import openvino as ov

    try:
        with quiet():
            return ov.convert_model(str(path))
    except Exception as e:
        raise TargetError(f"OpenVINO could not convert {what}", f"{type(e).__name__}: {str(e)[:300]}",
                          fix) from None


class OpenvinoTarget(Target):
    name = "openvino"
    extra = "openvino"
    build_imports = ("openvino", "nncf")
    precisions = ("fp32", "fp16", "int8")
    description = "OpenVINO IR for Intel CPUs, iGPUs and NPUs (NUCs, industrial PCs, Core Ultra)"
    options_spec = OPTIONS
    precision_labels = {"fp16": "fp16 (float16 weights; float32 compute on CPU, fp16 on GPU and NPU)",
                        "int8": "int8 (NNCF post-training quantization: int8 weights and activations where OpenVINO "
                                "runs them in integer)"}
    runtime_packages = ("openvino",)
    decoder_refusal = "the OpenVINO target has no KV-cache decoder path yet (OpenVINO GenAI's is the one to use)"
    calib_methods = ("minmax", "percentile", "entropy")  # the Q/DQ quantizer's; NNCF takes minmax (see check)

    def check(self, config: "BuildConfig") -> list[Problem]:
        problems = super().check(config)
        opts = config.target_options
        if not one_of(opts.get("quantizer", "auto"), ("auto", "nncf", "qdq")):
            problems.append(Problem("target_options.quantizer", "quantizer must be auto, nncf or qdq", ""))
        if opts.get("quantizer") == "qdq" and any(k in opts for k in NNCF_ONLY):
            problems.append(Problem("target_options", f"{', '.join(k for k in NNCF_ONLY if k in opts)} apply to "
                                    "quantizer=nncf only", "drop them or use --option quantizer=nncf"))
        if not one_of(opts.get("model_type", "auto"), ("auto", "transformer", "cnn")):
            problems.append(Problem("target_options.model_type", "model_type must be auto, transformer or cnn", ""))
        if not one_of(opts.get("preset", "auto"), ("auto", "performance", "mixed")):
            problems.append(Problem("target_options.preset", "preset must be auto, performance or mixed", ""))
        if not one_of(opts.get("activation_ranges", "auto"), ("auto", *RANGES)):
            problems.append(Problem("target_options.activation_ranges", f"activation_ranges must be auto, "
                                    f"{', '.join(RANGES)}", ""))
        if not one_of(opts.get("fast_bias_correction", True), (True, False)):
            problems.append(Problem("target_options.fast_bias_correction", "fast_bias_correction must be true or "
                                    "false", ""))
        nodes = opts.get("ignored_nodes", [])
        if not (isinstance(nodes, list) and all(isinstance(n, str) for n in nodes)):
            problems.append(Problem("target_options.ignored_nodes", "ignored_nodes must be a list of node names", ""))
        int8_only = [k for k in OPTIONS if k in opts]
        if int8_only and config.precision != "int8":
            problems.append(Problem("target_options", f"{', '.join(int8_only)} apply to --precision int8 only",
                                    "drop them or use --precision int8"))
        if opts.get("quantizer") == "nncf" and config.calibration.method not in ("auto", "minmax"):
            problems.append(Problem("calibration.method", _NNCF_METHOD.format(config.calibration.method), ""))
        return problems

    def layer_fallback(self, config: "BuildConfig") -> str:
        return ("not driven by edgeexport for OpenVINO: keep nodes in float with --option ignored_nodes=[...] "
                "(NNCF's ignored scope)")

    def build(self, source: "ModelSource", config: "BuildConfig", calibration: "CalibrationSet", workdir: Path,
              onnx_path: Path) -> Artifact:
        require_modules((("openvino", "openvino"), ("nncf", "nncf")), self.extra, "the OpenVINO target")
        import openvino as ov

        out = workdir / "openvino"
        out.mkdir(parents=True, exist_ok=True)
        settings: dict[str, Any] = {"format": "openvino-ir", "converter": f"openvino {ov.__version__}"}
        notes: list[str] = []
        if config.precision == "int8":  # each quantizer converts the graph it quantizes
            model = self._quantize(config, calibration, onnx_path, settings, workdir, notes)
        else:
            model = _convert(onnx_path, "the ONNX model")
        ov.save_model(model, str(out / MODEL_FILE), compress_to_fp16=config.precision == "fp16")
        if config.precision == "fp16":
            settings["weights"] = "float16 (compressed IR); compute float32 on CPU"
        # the CPU plugin would choose bf16 by itself where the CPU has it: pin what the build validates
        runtime_config = {"inference_precision": {"CPU": "f32"}}
        artifact = Artifact(self.name, config.precision, out, [MODEL_FILE, WEIGHTS_FILE], settings,
                            {"openvino": ov.__version__}, notes, runtime_config,
                            model_parts=[MODEL_FILE, WEIGHTS_FILE])
        if config.precision == "int8":
            from edgeexport.bundle.loader import int8_kernel_choice, int8_saturation
            from edgeexport.recipes import record_share

            record_share(artifact, lambda: integer_share(artifact.model_path))
            # NNCF and the Q/DQ recipe both write FakeQuantize with 8-bit weights (NNCF's overflow fix aside)
            artifact.runtime_config["int8"] = {"weight_bits": 8, "qdq": True}
            why = int8_saturation()
            artifact.settings["build_machine_int8"] = why or "this machine's int8 kernels compute the graph exactly"
            if int8_kernel_choice({"runtime_config": artifact.runtime_config})[0]:
                artifact.validated_with = ("OpenVINO's CPU plugin with FakeQuantize run as written (the exact int8 "
                                           "arithmetic of a device that accumulates in int32): " + why)
                notes.append(f"{why}; the build validates the FakeQuantize graph as written and times this CPU's "
                             "int8 kernels for speed only. On such a CPU the loader runs the graph exactly too "
                             "(slower)")
        return artifact

    def _quantize(self, config: "BuildConfig", calibration: "CalibrationSet", onnx_path: Path,
                  settings: dict[str, Any], workdir: Path, notes: list[str]) -> Any:
        import onnx

        from edgeexport.recipes import family

        opts = {k: config.target_options.get(k, default) for k, (default, _) in OPTIONS.items()}
        graph_family = family(onnx.load(str(onnx_path), load_external_data=False))
        quantizer = opts["quantizer"]
        settings.update(quantizer_requested=opts["quantizer"], graph_family=graph_family)
        if quantizer == "auto" and graph_family != "cnn" and not opts["ignored_nodes"] \
                and config.calibration.method in ("auto", "minmax"):
            return self._quantize_both(config, calibration, onnx_path, settings, workdir, notes, opts, graph_family)
        if quantizer == "auto":
            quantizer = "qdq" if graph_family == "cnn" or config.calibration.method not in ("auto", "minmax") \
                else "nncf"
        settings["quantizer_choice"] = quantizer
        if quantizer == "qdq":
            return self._quantize_qdq(config, calibration, onnx_path, settings, workdir, notes, opts)
        return self._quantize_nncf(_convert(onnx_path, "the ONNX model"), config, calibration, settings, opts,
                                   graph_family)

    def _quantize_both(self, config: "BuildConfig", calibration: "CalibrationSet", onnx_path: Path,
                       settings: dict[str, Any], workdir: Path, notes: list[str], opts: dict[str, Any],
                       graph_family: str) -> Any:
        """quantizer=auto on a transformer. NNCF's transformer scheme quantizes more (attention too); the Q/DQ recipe
        only the weighted layers. Which one keeps the model is a property of the model (all-MiniLM-L6-v2: NNCF 0.9979
        vs Q/DQ 0.9969 sentence cosine; a small encoder built here: NNCF 0.977, under the gate's 0.98, vs Q/DQ
        0.9999). Both are built, compared with the float IR as the gate compares (real tokens only for token
        outputs), FakeQuantize run as written, on calibration samples (never the held-out ones); the one with the
        higher worst-output SNR is kept."""
        from edgeexport.recipes import take

        float_model = _convert(onnx_path, "the ONNX model")
        feeds = take(calibration.calibration(), TRIAL_SAMPLES)
        built: dict[str, tuple[Any, dict[str, Any], list[str]]] = {}
        for name in ("nncf", "qdq"):
            s: dict[str, Any] = {}
            n: list[str] = []
            model = (self._quantize_nncf(float_model.clone(), config, calibration, s, opts, graph_family)
                     if name == "nncf" else self._quantize_qdq(config, calibration, onnx_path, s, workdir, n, opts))
            built[name] = (model, s, n)
        snr = {name: _worst_snr(_gate_on(float_model, model, feeds, config)) for name, (model, _, _) in built.items()}
        choice = "qdq" if snr["qdq"] > snr["nncf"] else "nncf"
        model, chosen, more = built[choice]
        settings.update(chosen, quantizer_choice=choice,
                        quantizer_trial={"snr_db": {k: round(v, 2) for k, v in snr.items()}, "samples": len(feeds),
                                         "measured_on": "calibration samples, FakeQuantize run as written, against "
                                                        "the float IR; worst output, real tokens only"})
        notes.extend(more)
        notes.append(f"quantizer=auto: built both int8 quantizers for this {graph_family}; kept {choice} (output SNR "
                     + ", ".join(f"{k} {v:.1f} dB" for k, v in snr.items()) + f" on {len(feeds)} calibration samples)")
        return model

    def _quantize_qdq(self, config: "BuildConfig", calibration: "CalibrationSet", onnx_path: Path,
                      settings: dict[str, Any], workdir: Path, notes: list[str], opts: dict[str, Any]) -> Any:
        """The shared Q/DQ recipe, then OpenVINO's converter: each QuantizeLinear/DequantizeLinear pair becomes a
        FakeQuantize that the CPU plugin runs in integer."""
        import openvino as ov

        from edgeexport.quantize import quantize_static

        qdq = workdir / "openvino-qdq.onnx"
        recorded, more = quantize_static(onnx_path, qdq, dict(QDQ_OPTIONS, exclude_nodes=list(opts["ignored_nodes"])),
                                         config, calibration, workdir)
        notes.extend(more)
        settings.update({k: v for k, v in recorded.items() if k != "format"})
        settings["quantizer"] = f"{recorded['quantizer']} (Q/DQ), converted by openvino {ov.__version__}"
        return _convert(qdq, "the Q/DQ model", "use --option quantizer=nncf")

    def _quantize_nncf(self, model: Any, config: "BuildConfig", calibration: "CalibrationSet",
                       settings: dict[str, Any], opts: dict[str, Any], graph_family: str) -> Any:
        import nncf

        model_type = opts["model_type"] if opts["model_type"] != "auto" else graph_family
        method = config.calibration.method
        if method not in ("auto", "minmax"):
            raise TargetError(_NNCF_METHOD.format(method), f"this {graph_family} graph is quantized by NNCF "
                              "(--option quantizer=auto)", "drop --calib-method, or pass --option quantizer=qdq")
        feeds = list(calibration.calibration())
        kwargs: dict[str, Any] = {"subset_size": len(feeds), "fast_bias_correction": bool(opts["fast_bias_correction"])}
        if model_type == "transformer":
            kwargs["model_type"] = nncf.ModelType.TRANSFORMER
        if opts["preset"] != "auto":
            kwargs["preset"] = {"performance": nncf.QuantizationPreset.PERFORMANCE,
                                "mixed": nncf.QuantizationPreset.MIXED}[opts["preset"]]
        ranges = opts["activation_ranges"]
        if ranges == "auto":
            ranges = "minmax" if method == "minmax" else "mean_minmax"  # NNCF's own default
        kwargs["advanced_parameters"] = nncf.AdvancedQuantizationParameters(
            activations_range_estimator_params=getattr(nncf.quantization.range_estimator.RangeEstimatorParametersSet,
                                                       ranges.upper()))
        if opts["ignored_nodes"]:
            names = {op.get_friendly_name() for op in model.get_ops()}
            unknown = [n for n in opts["ignored_nodes"] if n not in names]
            if unknown:
                raise TargetError(f"ignored_nodes names node(s) the OpenVINO model does not have: "
                                  f"{', '.join(unknown[:5])}", "names are the IR's friendly names",
                                  "use names from the report's layer list, or drop them")
            kwargs["ignored_scope"] = nncf.IgnoredScope(names=list(opts["ignored_nodes"]))
        try:
            with quiet():
                quantized = nncf.quantize(model, nncf.Dataset(feeds), **kwargs)
        except Exception as e:
            raise TargetError("NNCF post-training quantization failed", f"{type(e).__name__}: {str(e)[:300]}",
                              "keep the failing nodes in float (--option ignored_nodes=[...]) or use --target ort") from None
        settings.update({"quantization": "static", "quantizer": f"nncf {importlib.metadata.version('nncf')}",
                         "model_type": model_type, "model_type_requested": config.target_options.get("model_type", "auto"),
                         "preset": opts["preset"] if opts["preset"] != "auto" else "NNCF default",
                         "activation_ranges": ranges,
                         "activation_ranges_requested": opts["activation_ranges"],
                         "fast_bias_correction": bool(opts["fast_bias_correction"]),
                         "calibration_samples": len(feeds), "calibration_method": "NNCF statistics (min/max)",
                         "ignored_nodes": list(opts["ignored_nodes"]),
                         "fake_quantize_nodes": sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())})
        return quantized

    def load(self, artifact: Artifact, threads: Optional[int] = None) -> Runner:
        return OpenvinoRunner(artifact, threads)

    def load_for_timing(self, artifact: Artifact, threads: Optional[int] = None) -> Optional[Runner]:
        if artifact.validated_with:  # FakeQuantize ran as written to validate: time the int8 kernels
            return OpenvinoRunner(artifact, threads, int8_kernels="native")
        return None

    def requirements(self, artifact: Artifact) -> list[str]:
        major, minor = artifact.runtime["openvino"].split(".")[:2]
        return ["numpy", f"openvino>={major}.{minor}"]


def integer_share(model_xml: Path) -> dict[str, Any]:
    """From the IR: each weighted op's multiply-adds (static shapes; a dynamic dimension counts as 1) and whether both
    its inputs arrive quantized (a FakeQuantize on the activation, an integer or fake-quantized weight). From the CPU
    plugin's compiled graph: how many weighted layers really run in integer there."""
    import openvino as ov

    core = ov.Core()
    macs = {"int": 0, "float": 0}
    floats: list[str] = []
    layers = 0
    ops = core.read_model(str(model_xml)).get_ops()
    for op in ops:
        if op.get_type_name() not in WEIGHTED_OPS:
            continue
        layers += 1
        n = _macs(op)
        weight = op.input_value(WEIGHT_INPUT.get(op.get_type_name(), 1)).get_node()
        quantized = _source(op, 0).get_type_name() == "FakeQuantize" and _quantized_weight(weight)
        macs["int" if quantized else "float"] += n
        if not quantized:
            floats.append(op.get_friendly_name())
    weight_bytes = {"int": 0, "float": 0}
    for op in ops:
        if op.get_type_name() == "Constant" and op.get_output_size() and np.prod(op.get_output_shape(0)) > 64:
            t = op.get_output_element_type(0).get_type_name()
            size = int(np.prod(op.get_output_shape(0))) * op.get_output_element_type(0).size
            weight_bytes["int" if t in ("i8", "u8", "i4", "u4") else "float"] += size
    compiled = core.compile_model(str(model_xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    runtime = [op.get_rt_info() for op in compiled.get_runtime_model().get_ops()]
    runtime = [i for i in runtime if "layerType" in i and i["layerType"].astype(str) in RUNTIME_WEIGHTED]
    total_macs, total_bytes = sum(macs.values()) or 1, sum(weight_bytes.values()) or 1
    return {"integer_mac_share": macs["int"] / total_macs, "integer_weight_share": weight_bytes["int"] / total_bytes,
            "weighted_layers": layers, "float_weighted_layers": len(floats), "float_layers_sample": floats[:10],
            "macs_per_sample": sum(macs.values()),
            "cpu_runtime_integer_layers": sum(i["runtimePrecision"].astype(str) in INTEGER for i in runtime),
            "cpu_runtime_weighted_layers": len(runtime)}


def _source(op: Any, index: int) -> Any:
    """The op feeding input ``index``, looking through ops that keep a quantized tensor quantized."""
    node = op.input_value(index).get_node()
    while node.get_type_name() in ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "MaxPool") and node.get_input_size():
        node = node.input_value(0).get_node()
    return node


def _quantized_weight(node: Any, depth: int = 5) -> bool:
    """An integer Constant (NNCF's compressed weights: i8 -> Convert -> Subtract/Multiply) or a FakeQuantize."""
    if node.get_type_name() == "FakeQuantize":
        return True
    if node.get_type_name() == "Constant":
        return node.get_output_element_type(0).get_type_name() in ("i8", "u8", "i4", "u4")
    return depth > 0 and any(_quantized_weight(node.input_value(i).get_node(), depth - 1)
                             for i in range(node.get_input_size()))


def _static(shape: Any) -> list[int]:
    return [d.get_length() if d.is_static else 1 for d in shape]


def _macs(op: Any) -> int:
    kind = op.get_type_name()
    if kind in WEIGHT_INPUT:  # batch x steps x (W: directions x gates*hidden x input + R: ... x hidden)
        x, w = _static(op.get_input_partial_shape(0)), WEIGHT_INPUT[kind]
        return x[0] * x[1] * sum(int(np.prod(_static(op.get_input_partial_shape(i)))) for i in (w, w + 1))
    out = int(np.prod(_static(op.get_output_partial_shape(0))))
    weight = _static(op.get_input_partial_shape(1))
    if kind == "Convolution":
        return out * int(np.prod(weight[1:]))
    if kind == "GroupConvolution":
        return out * int(np.prod(weight[2:]))
    a = _static(op.get_input_partial_shape(0))
    transposed = op.get_attributes().get("transpose_a", False)
    return out * (a[-2] if transposed and len(a) > 1 else a[-1])


class OpenvinoRunner(Runner):
    """Build-time runner: the very backend the bundle's loader ships (backend.py in this unit), on the CPU."""

    def __init__(self, artifact: Artifact, threads: Optional[int] = None, int8_kernels: Optional[str] = None
                 ) -> None:
        from edgeexport.targets.openvino.backend import OpenvinoBackend

        manifest = {"runtime": artifact.runtime, "runtime_config": artifact.runtime_config}
        with quiet():  # the backend's warning about this CPU's int8 kernels is the build's note
            self.backend = OpenvinoBackend(artifact.model_path, manifest, threads=threads, int8_kernels=int8_kernels)
        compiled = self.backend.compiled
        self.inputs = [_info(p) for p in compiled.inputs]
        self.outputs = [_info(p) for p in compiled.outputs]

    def _infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.backend.run(dict(feeds))


TRIAL_SAMPLES = 32


class _Compiled(Runner):
    """An OpenVINO model compiled for the CPU in float32 with FakeQuantize run as written (no low-precision
    transformations): the int8 arithmetic, whatever this CPU's int8 kernels do."""

    def __init__(self, model: Any) -> None:
        import openvino as ov

        self.compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                               "LP_TRANSFORMS_MODE": "NO"})
        self.inputs = [_info(p) for p in self.compiled.inputs]
        self.outputs = [_info(p) for p in self.compiled.outputs]

    def _infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self.compiled(dict(feeds))
        return {o.name: np.asarray(result[p]) for o, p in zip(self.outputs, self.compiled.outputs)}


def _worst_snr(report: Any) -> float:
    """The lowest output SNR of a validation report, over real tokens where the output has them."""
    return float(min(m.get("snr_db_unpadded", m["snr_db"]) for m in report.outputs.values()))


def _gate_on(reference: Any, quantized: Any, feeds: list[dict[str, np.ndarray]], config: "BuildConfig") -> Any:
    """The gate's comparison (its metrics, masks and limits) of ``quantized`` against ``reference`` on ``feeds``."""
    from edgeexport.validate import collect, compare

    refs, outs, masks = collect(_Compiled(reference), _Compiled(quantized), feeds)
    return compare(refs, outs, config.resolved_tolerance(), masks=masks, task=config.task)


def _info(port: Any) -> TensorInfo:
    shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
    return TensorInfo(port.get_any_name(), shape, port.get_element_type().to_dtype().name)
