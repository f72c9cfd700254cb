"""ONNX quantization steps shared by the targets that hand an ONNX graph to their runtime (ORT, TensorRT).

Targets never import each other; what two of them need lives here: fp16 conversion, ORT's pre-processing,
calibration of tensor ranges (with the entropy -> percentile -> minmax fallback), and the Q/DQ pass fed by those
ranges. Calibrating once and quantizing from the recorded ranges means every artifact derived from one build (the
Q/DQ graph, TensorRT's calibration cache) uses exactly the same numbers.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np

from edgeexport.errors import TargetError
from edgeexport.util import progress, quiet

if TYPE_CHECKING:  # pragma: no cover
    from edgeexport.calibration import CalibrationSet
    from edgeexport.config import BuildConfig

PROBE_SAMPLES = 8
#: samples per onnxruntime collect_data call (see collect_chunked)
CALIBRATION_CHUNK = 32
FALLBACKS = {"entropy": ["entropy", "percentile", "minmax"], "percentile": ["percentile", "minmax"]}


def to_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """float32 -> float16 weights and compute, inputs and outputs kept as declared (float32)."""
    import onnx
    from onnxruntime.transformers import float16

    with quiet():
        model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    return {"fp16_converter": "onnxruntime.transformers.float16", "keep_io_types": True}


class Reader:
    """onnxruntime CalibrationDataReader over the calibration split (never the holdout)."""

    def __init__(self, feeds: Iterator[dict[str, np.ndarray]]) -> None:
        self._it = feeds

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        return next(self._it, None)


def collect_chunked(calibrator, feeds: Iterator[dict[str, np.ndarray]], chunk: int = CALIBRATION_CHUNK) -> int:
    """Feed ``calibrator`` ``chunk`` samples per ``collect_data`` call. onnxruntime's calibrators keep every
    intermediate output of a call until it ends (histogram calibrators: whole activation tensors), and merge the
    ranges or histograms of successive calls; so memory is bounded by a chunk, not by the number of samples.
    (``max_intermediate_outputs`` is no substitute: in onnxruntime 1.32 it drops the outputs it clears.)"""
    it = iter(feeds)
    total = 0
    while batch := list(itertools.islice(it, chunk)):
        calibrator.collect_data(Reader(iter(batch)))
        total += len(batch)
    return total


def preprocess(src: Path, dst: Path) -> list[str]:
    """ORT's quant_pre_process (shape inference, basic fusions); BERT-like graphs fall back to skipping the
    symbolic shape inference."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes = []
    src, dst = Path(src).resolve(), Path(dst).resolve()  # the chdir below must not change what they name
    # symbolic shape inference writes temporary files (sym_shape_infer_temp.onnx, <uuid>.data) to the current
    # directory: keep them in the build's temporary folder
    with quiet(), contextlib.chdir(dst.parent):
        try:
            quant_pre_process(str(src), str(dst))
        except Exception as e:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
            notes.append(f"symbolic shape inference failed ({type(e).__name__}); pre-processed with skip_symbolic_shape=True")
    return notes


def smooth_for_int8(pre: Path, calibration: "CalibrationSet", choice: Any, family: str) -> dict[str, Any]:
    """SmoothQuant ``pre`` in place when ``choice`` asks for it (``"auto"``: transformers only), and the manifest's
    record of what was done."""
    from edgeexport import smoothquant
    from edgeexport.recipes import take

    if choice is False or (choice == "auto" and family != "transformer"):
        return {"smoothquant": False}
    n = min(smoothquant.SAMPLES, len(calibration.calib_idx))
    feeds = progress(iter(take(calibration.calibration(), n)), f"smoothing activation outliers ({n} samples)", total=n)
    return smoothquant.smooth(pre, pre, feeds)


def nonfinite_exclusions(pre: Path, calibration: "CalibrationSet") -> tuple[list[str], list[str]]:
    """Nodes to keep in float because their tensors hold values no 8-bit range can represent on calibration data
    (-inf/inf/NaN, or sentinels such as the -3.4e38 of an additive attention mask), and a note saying so."""
    from edgeexport.recipes import take, unrepresentable_nodes

    nodes, tensors = unrepresentable_nodes(pre, take(calibration.calibration(), PROBE_SAMPLES))
    if not nodes:
        return [], []
    return nodes, [f"kept {len(nodes)} node(s) in float because {len(tensors)} of their tensors hold -inf/inf/NaN or "
                   f"sentinel values (e.g. the -3.4e38 of an additive attention mask) that no 8-bit range can "
                   f"represent next to ordinary values: {', '.join(nodes[:5])}{' ...' if len(nodes) > 5 else ''}"]


def wide_range_exclusions(pre: Path, calibration: "CalibrationSet", op_types: list[str], enabled: Any = True
                          ) -> tuple[list[str], list[str], dict[str, Any]]:
    """Layers of ``op_types`` to keep in float because their activation input spans too many
    orders of magnitude for one 8-bit range (:func:`edgeexport.recipes.wide_range_inputs`), a note, and the
    manifest's record. ``enabled`` False (``--option wide_range_float=false``) quantizes them anyway and says so."""
    from edgeexport.recipes import INTEGER_INPUT_OPS, take, wide_range_inputs, wide_range_note

    types = [t for t in INTEGER_INPUT_OPS if t in set(op_types) or (t == "Gemm" and "MatMul" in op_types)]
    found = wide_range_inputs(pre, take(calibration.calibration(), PROBE_SAMPLES), types)
    if not found:
        return [], [], {}
    record = {"wide_range_float": bool(enabled), "wide_range_inputs": found}
    if not enabled:
        return [], [f"quantized {len(found)} layer(s) whose input spans too many orders of magnitude for 8 bits, "
                    f"as --option wide_range_float=false asks: {', '.join(list(found)[:4])}"], record
    return sorted(found), [wide_range_note(found)], record


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def calibrate_ranges(pre: Path, calibration: "CalibrationSet", method: str, percentile: float, ranges_json: Path,
                     op_types: Optional[list[str]] = None, symmetric: bool = False) -> tuple[str, list[str]]:
    """Run the calibration split through ``pre`` and record each float tensor's range in ``ranges_json`` (ORT's
    JSON calibration cache). ``op_types`` None calibrates every tensor. Returns (method used, notes).

    Histogram calibrators (entropy, percentile) break on tensors holding -inf/huge values, e.g. additive attention
    masks ("Too many bins", "range is not finite"): fall back, in order, and say so."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    n = len(calibration.calib_idx)
    failures: list[str] = []
    for m in FALLBACKS.get(method, [method]):
        extra: dict[str, Any] = {"symmetric": symmetric}
        if m == "percentile":
            extra["percentile"] = percentile
        feeds = progress(calibration.calibration(), f"calibrating ({m}, {n} samples)", total=n)
        try:
            with quiet():
                calibrator = create_calibrator(pre, op_types, augmented_model_path=str(pre.parent / f"augmented_{m}.onnx"),
                                               calibrate_method=_method(m), extra_options=extra)
                collect_chunked(calibrator, feeds)
                ranges = calibrator.compute_data()
            save_tensors_data(ranges, ranges_json)
        except Exception as e:
            failures.append(f"{m}: {type(e).__name__}: {str(e)[:160]}")
            continue
        notes = [f"{method} calibration failed ({failures[0]}); used {m} instead"] if failures else []
        return m, notes
    raise TargetError(f"calibration failed ({', '.join(FALLBACKS.get(method, [method]))})", "; ".join(failures),
                      "exclude the failing nodes (--option exclude_nodes=[...]) or try --precision int8-dynamic")


def load_ranges(ranges_json: Path) -> dict[str, tuple[float, float]]:
    """tensor name -> (lowest, highest) from ORT's JSON calibration cache."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    return {name: (float(np.min(t.range_value[0])), float(np.max(t.range_value[1])))
            for name, t in load_tensors_data(ranges_json).items()}


def quantize_qdq(pre: Path, dst: Path, ranges_json: Path, method: str, *, per_channel: bool, reduce_range: bool,
                 activation_type: str, op_types: Optional[list[str]], exclude_nodes: list[str],
                 extra_options: Optional[dict[str, Any]] = None, nodes: Optional[list[str]] = None,
                 int16_tensors: Optional[list[str]] = None) -> None:
    """Static QDQ quantization from the ranges :func:`calibrate_ranges` recorded (no second calibration pass).
    ``nodes`` restricts it to those nodes; ``int16_tensors`` get 16-bit activations (8-bit weights stay)."""
    from onnxruntime.quantization import QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    extra = dict(extra_options or {})
    if int16_tensors:
        wide = QuantType.QUInt16 if activation_type == "uint8" else QuantType.QInt16
        overrides = dict(extra.get("TensorQuantOverrides", {}))
        overrides.update({t: [{"quant_type": wide}] for t in int16_tensors})
        extra["TensorQuantOverrides"] = overrides

    with quiet():
        try:
            ort_quantize_static(
                str(pre), str(dst), None, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8 if activation_type == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8, calibrate_method=_method(method), op_types_to_quantize=op_types,
                nodes_to_exclude=exclude_nodes, nodes_to_quantize=nodes, extra_options=extra,
                calibration_cache_path=str(ranges_json),
            )
        except Exception as e:
            raise TargetError("ONNX Runtime static quantization failed", f"{type(e).__name__}: {str(e)[:300]}",
                              "exclude the failing nodes (--option exclude_nodes=[...]) or try --precision "
                              "int8-dynamic") from None


def requantize_corrected(pre: Path, dst: Path, ranges_json: Path, method: str, calibration: "CalibrationSet",
                         qargs: dict[str, Any], bias_correction: bool, rounding: str) -> dict[str, Any]:
    """After :func:`quantize_qdq` wrote ``dst`` from ``pre``: round the weights with GPTQ on the grids ``dst`` holds
    (``rounding='gptq'``) and/or correct each bias for the rounding (``bias_correction``), then quantize again from
    the same ranges (each weight comes out on the same grid; the quantizer finds GPTQ's integers). Returns the
    manifest's record of it."""
    import onnx

    from edgeexport import gptq, recipes

    if not bias_correction and rounding != "gptq":
        return {"bias_correction": False, "weight_rounding": "nearest"}
    qdq = onnx.load(str(dst))
    fixed, done = recipes.correct_weights(pre, pre.parent / "corrected.onnx", recipes.dequantized_weights(qdq),
                                          gptq.qdq_grids(qdq), calibration, bias_correction, rounding)
    if bias_correction and not done["bias_corrected_layers"]:
        done["bias_correction"] = "no Conv/Gemm with a bias was quantized"
    if fixed != pre:
        quantize_qdq(fixed, dst, ranges_json, method, **qargs)
    return done


def quantize_static(src: Path, dst: Path, opts: dict[str, Any], config: "BuildConfig",
                    calibration: "CalibrationSet", workdir: Path) -> tuple[dict[str, Any], list[str]]:
    """The static int8 Q/DQ recipe (ONNX Runtime's quantizer driven per model): pre-processing, SmoothQuant for
    transformers, non-finite exclusions, calibrated ranges (auto: percentile for CNNs, minmax for transformers),
    GPTQ weights and bias correction. ``opts`` are the ort target's options (resolved). Writes ``dst``; returns the
    manifest's record and notes. Shared by every target that ships or converts a Q/DQ graph."""
    import onnx

    from edgeexport import recipes

    pre = workdir / "preprocessed.onnx"
    notes = preprocess(src, pre)
    family = recipes.family(onnx.load(str(pre)))  # before smoothing; its Mul nodes do not change the family
    smoothed = smooth_for_int8(pre, calibration, opts["smoothquant"], family)
    model = onnx.load(str(pre))
    check_names(model.graph, opts)
    nonfinite, more = nonfinite_exclusions(pre, calibration)
    notes += more
    recipe = opts["recipe"] if opts["recipe"] != "auto" else ("weighted" if family == "transformer" else "full")
    wide, more, wide_record = wide_range_exclusions(pre, calibration, list(opts["op_types"] or recipes.INTEGER_INPUT_OPS),
                                                    opts.get("wide_range_float", True))
    notes += more
    exclude = sorted(set(opts["exclude_nodes"]) | set(nonfinite) | set(wide))
    # weighted: the layers with constant weights, and the embedding tables (weight-only: a Gather of int8 rows)
    nodes = ([n for n in recipes.weighted_nodes(model) + recipes.table_gathers(model) if n not in exclude]
             if recipe == "weighted" else None)
    # (Gemm keeps its output Q/DQ in the weighted recipe: ORT 1.32 fails to load a Q/DQ Gemm with a float output
    # feeding a Reshape, "Attempt to replace the existing tensor")
    no_output_q = (["Conv", "ConvTranspose", "MatMul"] if recipe == "weighted" else
                   recipes.output_op_types(model) if opts["float_outputs"] else [])
    extra = {"OpTypesToExcludeOutputQuantization": no_output_q} if no_output_q else {}
    method = recipes.calib_method(config.calibration.method, family)
    ranges = workdir / "ranges.json"
    used, more = calibrate_ranges(pre, calibration, method, config.calibration.percentile, ranges, opts["op_types"])
    notes += more
    qargs = dict(per_channel=opts["per_channel"], reduce_range=opts["reduce_range"],
                 activation_type=opts["activation_type"], op_types=opts["op_types"], exclude_nodes=exclude,
                 extra_options=extra, nodes=nodes, int16_tensors=opts["int16_tensors"])
    quantize_qdq(pre, dst, ranges, used, **qargs)
    if extra and not loads_in_onnxruntime(dst):  # the runtime must load what ships: fall back to quantized outputs, and say so
        notes.append(f"onnxruntime cannot load the graph with unquantized outputs of {', '.join(no_output_q)}; "
                     "their outputs are quantized instead")
        no_output_q, qargs["extra_options"] = [], {}
        quantize_qdq(pre, dst, ranges, used, **qargs)
    corrected = requantize_corrected(pre, dst, ranges, used, calibration, qargs, opts["bias_correction"],
                                     opts["weight_rounding"])
    settings = {
        "quantization": "static", "format": "onnx-qdq", "quantizer": f"onnxruntime.quantization {_ort_version()}",
        "recipe": recipe, "recipe_requested": opts["recipe"], "graph_family": family,
        "calibration_method": used, "calibration_method_requested": config.calibration.method,
        "calibration_samples": len(calibration.calib_idx), "weight_type": "int8",
        "activation_type": opts["activation_type"], "per_channel": opts["per_channel"], "device": opts["device"],
        "reduce_range": opts["reduce_range"], "reduce_range_reason": opts["reduce_range_reason"],
        "op_types": opts["op_types"] or ("Conv/Gemm/MatMul with constant weights" if recipe == "weighted"
                                         else "ORT default"),
        "unquantized_outputs_of": no_output_q, "exclude_nodes": exclude,
        "int16_tensors": list(opts["int16_tensors"]), **corrected, **smoothed, **wide_record,
    }
    if used == "percentile":
        settings["percentile"] = config.calibration.percentile
    return settings, notes


def loads_in_onnxruntime(path: Path) -> bool:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception:  # any load failure: the caller tries the safer recipe
        return False
    return True


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def check_names(graph: Any, opts: dict[str, Any], dynamic: bool = False) -> None:
    """exclude_nodes must name nodes, int16_tensors tensors and op_types op types of the graph (and, for dynamic
    quantization, op types it has integer kernels for): a typo is never skipped silently."""
    present = {n.op_type for n in graph.node}
    if dynamic and "Gemm" in present:
        present.add("MatMul")  # the dynamic quantizer rewrites Gemm as MatMul and quantizes it under that name
    asked = list(opts.get("op_types") or [])
    absent = [t for t in asked if t not in present]
    if absent:
        raise TargetError(f"--option op_types names op type(s) the graph does not have: {', '.join(absent)}",
                          f"the graph's op types: {', '.join(sorted(present))}",
                          "name op types from that list (case matters), or drop op_types for the recipe's choice")
    if dynamic:
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        unknown = [t for t in asked if t not in IntegerOpsRegistry]
        if unknown:
            raise TargetError(f"dynamic quantization cannot quantize {', '.join(unknown)}",
                              f"onnxruntime's dynamic quantizer has integer kernels for "
                              f"{', '.join(sorted(IntegerOpsRegistry))} only",
                              ("Gemm is quantized as MatMul (onnxruntime rewrites it): use op_types=[MatMul]; "
                               if "Gemm" in unknown else "")
                              + "drop those op types, or use --precision int8 (static Q/DQ quantizes any op type)")
    nodes = {n.name for n in graph.node}
    tensors = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    for key, known, what in (("exclude_nodes", nodes, "node"), ("int16_tensors", tensors, "tensor")):
        missing = [x for x in opts[key] if x not in known]
        if missing:
            close = sorted(k for k in known if any(m.split("/")[-1] in k for m in missing))[:5]
            raise TargetError(f"--option {key} names {len(missing)} {what}(s) the graph does not have: "
                              f"{', '.join(missing[:5])}",
                              f"names are those of the pre-processed ONNX graph ({len(known)} {what}s)"
                              + (f"; similar: {', '.join(close)}" if close else ""),
                              "take the names from 'edgeexport build ... --explain' or the manifest's layer_errors")


def exact_integer_graph(src: Path, dst: Path) -> list[str]:
    """``src`` with each MatMulInteger and ConvInteger computed in float on the same integers (zero points
    subtracted, products summed in float32: exact while the sums stay below 2^24, as int8 x uint8 sums of up to a
    few hundred terms do), cast back to int32. It is the integer arithmetic of a device that accumulates in int32,
    for CPUs whose int8 kernels saturate (onnxruntime's dynamic int8 ops have no exact mode). Writes ``dst``;
    returns the op types left as they were (integer ops it does not rewrite, e.g. DynamicQuantizeLSTM)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    graph = model.graph
    nodes: list[Any] = []
    kept: set[str] = set()
    fresh = itertools.count()

    def as_float(name: str, zero_point: str, shape_for: Optional[int] = None) -> str:
        out = f"{name}__f{next(fresh)}"
        nodes.append(helper.make_node("Cast", [name], [out], to=TensorProto.FLOAT))
        if not zero_point:
            return out
        zp = f"{zero_point}__f{next(fresh)}"
        nodes.append(helper.make_node("Cast", [zero_point], [zp], to=TensorProto.FLOAT))
        if shape_for is not None:  # a per-output-channel weight zero point of a Conv: [M] -> [M, 1, 1, ...]
            shape = f"{zp}__shape"
            graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1] + [1] * shape_for, np.int64), shape))
            nodes.append(helper.make_node("Reshape", [zp, shape], [zp + "__r"]))
            zp += "__r"
        centred = f"{out}__c"
        nodes.append(helper.make_node("Sub", [out, zp], [centred]))
        return centred

    for node in graph.node:
        ins = list(node.input) + [""] * (4 - len(node.input))
        if node.op_type == "MatMulInteger":
            a, b = as_float(ins[0], ins[2]), as_float(ins[1], ins[3])
            y = f"{node.output[0]}__f"
            nodes.append(helper.make_node("MatMul", [a, b], [y]))
            nodes.append(helper.make_node("Cast", [y], [node.output[0]], to=TensorProto.INT32))
        elif node.op_type == "ConvInteger":
            x = as_float(ins[0], ins[2])
            w = as_float(ins[1], ins[3], shape_for=3)  # weights [M, C/g, kH, kW]: broadcast over 3 trailing axes
            y = f"{node.output[0]}__f"
            nodes.append(helper.make_node("Conv", [x, w], [y], **{a.name: helper.get_attribute_value(a)
                                                                   for a in node.attribute}))
            nodes.append(helper.make_node("Cast", [y], [node.output[0]], to=TensorProto.INT32))
        else:
            if node.op_type.startswith("DynamicQuantize") and node.op_type != "DynamicQuantizeLinear" or \
                    node.op_type in ("QLinearMatMul", "QLinearConv", "QAttention"):
                kept.add(node.op_type)
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(dst))
    return sorted(kept)
