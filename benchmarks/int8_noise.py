#!/usr/bin/env python3
"""Where a static int8 model's output error comes from: its weights, and each quantized activation tensor.

The model goes through the ORT target's static int8 recipe (the one `edgeexport build --precision int8` ships:
percentile ranges for CNNs, GPTQ weights, bias correction). Then, on held-out samples, the output error (mean
squared difference of the outputs against the float graph) is measured for:

- the int8 graph as written (each Q/DQ pair acting as fake-quantization, what a device accumulating in int32
  computes);
- its **weights alone**: the same graph with every activation Q/DQ pair removed (a ReLU/Clip that the quantizer
  folded into a Q/DQ range is put back), so only the rounded weights and corrected biases differ from float;
- **each activation tensor alone**: the weights-only graph plus that one tensor's Q/DQ pair. Its error minus the
  weights' error is that tensor's own contribution;
- the int8 graph with the tensor that contributes most given 16-bit activations (what one int16 tensor of
  `--accuracy-budget`'s mix buys, at best).

Contributions add up to about the whole when the errors are small and independent; the table prints the
remainder. It also prints where `--explain`'s ranking (own noise on exact inputs) places the top contributors, so
the ranking can be checked against the end-to-end measurement.

Writes benchmarks/results/int8_noise.{json,md}.

    python benchmarks/int8_noise.py [--model efficientnet] [--samples 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("EDGEEXPORT_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

#: activation ops a quantizer may fold into the Q/DQ range of the tensor they produce
FOLDABLE = ("Relu", "Clip")


def weights_only(qmodel: Any, fmodel: Any, keep: frozenset = frozenset()) -> Any:
    """``qmodel`` (a Q/DQ graph) without the Q/DQ pairs of its activation tensors, except those in ``keep``. Where
    the quantizer folded a Relu/Clip of ``fmodel`` into the range of the tensor it produced, the op is put back."""
    import onnx

    from edgeexport.recipes import constant_names

    model = onnx.ModelProto()
    model.CopyFrom(qmodel)
    consts = constant_names(model)
    f_producer = {o: n for n in fmodel.graph.node for o in n.output}
    q_producer = {o: n for n in model.graph.node for o in n.output}
    quantized = _activation_quantizers(model)
    bypass: dict[str, str] = {}  # a dropped DequantizeLinear's output -> the float tensor that replaces it
    restored: dict[str, Any] = {}  # tensor -> the folded activation node to re-insert after its producer
    dropped = set()
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in quantized and quantized[n.input[0]] not in keep:
            tensor = quantized[n.input[0]]
            src = tensor
            f_node, q_node = f_producer.get(tensor), q_producer.get(tensor)
            if f_node is not None and f_node.op_type in FOLDABLE and (q_node is None or q_node.op_type != f_node.op_type):
                src = f"{tensor}__refolded"
                if tensor not in restored:
                    act = onnx.NodeProto()
                    act.CopyFrom(f_node)
                    del act.input[:]
                    act.input.extend([tensor, *f_node.input[1:]])
                    del act.output[:]
                    act.output.append(src)
                    act.name = f"{f_node.name}__refolded"
                    restored[tensor] = act
            bypass[n.output[0]] = src
            dropped.add(id(n))
    dropped.update(id(n) for n in model.graph.node if n.op_type == "QuantizeLinear" and n.output[0] in quantized
                   and n.input[0] not in keep)
    f_consts = {t.name: t for t in fmodel.graph.initializer}
    needed = {i for act in restored.values() for i in act.input[1:] if i and i not in consts}
    model.graph.initializer.extend(f_consts[i] for i in needed if i in f_consts)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    for n in nodes:
        if id(n) in dropped:
            continue
        for k, name in enumerate(n.input):
            if name in bypass:
                n.input[k] = bypass[name]
        model.graph.node.append(n)
        for out in n.output:
            if out in restored:
                model.graph.node.append(restored.pop(out))
    for act in restored.values():  # a graph input's op (never folded in practice) goes first
        model.graph.node.insert(0, act)
    return model


def outputs(model: Any, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """``model``'s outputs on each feed, flattened, with graph optimization off (Q/DQ pairs as written)."""
    from edgeexport.onnxgraph import exposing_session

    sess, _ = exposing_session(model, [])
    names = [i.name for i in sess.get_inputs()]
    return [np.concatenate([np.asarray(o, np.float64).ravel() for o in sess.run(None, {k: f[k] for k in names})])
            for f in feeds]


def error(ref: list[np.ndarray], got: list[np.ndarray]) -> dict[str, float]:
    """Mean squared output error, SNR (dB) and, for a classifier's logits, top-1 agreement."""
    mse = float(np.mean([np.mean((r - g) ** 2) for r, g in zip(ref, got)]))
    signal = float(np.mean([np.mean(r ** 2) for r in ref]))
    top1 = float(np.mean([r.argmax() == g.argmax() for r, g in zip(ref, got)]))
    return {"mse": mse, "snr_db": 10 * float(np.log10(signal / mse)) if mse > 0 else 200.0, "top1": top1}


def _activation_quantizers(qmodel: Any) -> dict[str, str]:
    """QuantizeLinear output -> the activation tensor it quantizes (weights and other constants left out)."""
    from edgeexport.recipes import constant_names

    consts = constant_names(qmodel)
    return {n.output[0]: n.input[0] for n in qmodel.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in consts}


def activation_tensors(qmodel: Any) -> list[str]:
    return list(dict.fromkeys(_activation_quantizers(qmodel).values()))


def measure(name: str, samples: int, threads: int, work: Path, log=print) -> dict[str, Any]:
    import onnx
    import torch

    torch.set_num_threads(threads)
    from targets_vs_eager import MODELS

    from edgeexport import pipeline
    from edgeexport.config import BuildConfig
    from edgeexport.quantize import quantize_static
    from edgeexport.sensitivity import rank_layers
    from edgeexport.targets import get_target

    make, _, label = MODELS[name]
    spec = make(work)
    spec.setdefault("calibration", {})["holdout"] = samples
    config = BuildConfig(target="ort", precision="int8", out=str(work / "bundle"), force=True, **spec)
    config, source, calib = pipeline.resolve(config, log)
    exported = pipeline.export(config, source, calib, work / "model.onnx", log)
    target = get_target("ort")
    opts = target.options(config)

    def quantize(dst: Path, **over: Any) -> dict[str, Any]:
        workdir = work / f"wd_{dst.stem}"
        workdir.mkdir(exist_ok=True)
        settings, _ = quantize_static(exported.path, dst, {**opts, **over}, config, calib, workdir)
        return settings

    started = time.perf_counter()
    settings = quantize(work / "int8.onnx")
    log(f"==> int8 recipe built in {time.perf_counter() - started:.0f} s")
    feeds = list(calib.holdout())
    fmodel = onnx.load(str(work / "wd_int8" / "preprocessed.onnx"))
    qmodel = onnx.load(str(work / "int8.onnx"))
    ref = outputs(fmodel, feeds)
    full = error(ref, outputs(qmodel, feeds))
    weights = error(ref, outputs(weights_only(qmodel, fmodel), feeds))
    tensors = activation_tensors(qmodel)
    log(f"==> int8 {full['snr_db']:.2f} dB, weights alone {weights['snr_db']:.2f} dB; "
        f"{len(tensors)} activation tensors, one at a time on {len(feeds)} held-out samples")
    rows: list[dict[str, Any]] = []
    for k, tensor in enumerate(tensors):
        alone = error(ref, outputs(weights_only(qmodel, fmodel, frozenset({tensor})), feeds))
        rows.append({"tensor": tensor, "mse": alone["mse"] - weights["mse"]})
        if (k + 1) % 10 == 0:
            log(f"    {k + 1}/{len(tensors)}")
    rows.sort(key=lambda r: -r["mse"])
    ranking = rank_layers(work / "wd_int8" / "preprocessed.onnx", work / "int8.onnx", feeds[:32])
    position = {r["output"]: i + 1 for i, r in enumerate(ranking)}
    for r in rows:
        r["share"] = r["mse"] / full["mse"]
        r["explain_rank"] = position.get(r["tensor"])
    top = rows[0]["tensor"]
    quantize(work / "int16_top.onnx", int16_tensors=[top])
    int16_top = error(ref, outputs(onnx.load(str(work / "int16_top.onnx")), feeds))
    return {"model": name, "label": label, "samples": len(feeds), "threads": threads,
            "recipe": {k: settings.get(k) for k in ("calibration_method", "weight_rounding", "bias_correction",
                                                   "reduce_range", "per_channel", "activation_type", "recipe")},
            "int8": full, "weights_only": weights, "weights_share": weights["mse"] / full["mse"],
            "activations": rows, "activation_sum_share": sum(r["mse"] for r in rows) / full["mse"],
            "int16_top": {"tensor": top, **int16_top}}


def markdown(res: dict[str, Any], top: int) -> str:
    full, w = res["int8"], res["weights_only"]
    lines = [f"# Where {res['label']}'s int8 error comes from", "",
             f"ORT target, static int8 recipe ({', '.join(f'{k}={v}' for k, v in res['recipe'].items())}); "
             f"{res['samples']} held-out samples; Q/DQ pairs run as written (onnxruntime, graph optimization off). "
             "Error: mean squared difference of the outputs against the float graph. A tensor's share is the error "
             "of the rounded weights plus that tensor's Q/DQ alone, minus the weights' error, over the int8 graph's "
             "error.", "",
             "| graph | SNR dB | top-1 agreement | share of the int8 error |", "|---|---|---|---|",
             f"| int8 (as shipped) | {full['snr_db']:.2f} | {full['top1']:.4f} | 100% |",
             f"| weights only (activations float) | {w['snr_db']:.2f} | {w['top1']:.4f} | {res['weights_share']:.0%} |",
             f"| activation tensors, one at a time, summed | - | - | {res['activation_sum_share']:.0%} |",
             f"| remainder (interactions) | - | - | {1 - res['weights_share'] - res['activation_sum_share']:+.0%} |",
             "", f"Activation tensors contributing most ({len(res['activations'])} in all); `--explain` rank: where "
             "the build's own layer ranking (noise on exact inputs) puts the layer producing it:", "",
             "| tensor | share of the int8 error | --explain rank |", "|---|---|---|"]
    for r in res["activations"][:top]:
        lines.append(f"| {r['tensor']} | {r['share']:.1%} | {r['explain_rank'] or '-'} |")
    t = res["int16_top"]
    lines += ["", f"With `{t['tensor']}`, the largest contributor, in 16 bits: SNR "
              f"{t['snr_db']:.2f} dB ({t['snr_db'] - full['snr_db']:+.2f}), top-1 agreement {t['top1']:.4f} "
              f"({t['top1'] - full['top1']:+.4f}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="efficientnet", choices=("digits", "efficientnet"))
    parser.add_argument("--samples", type=int, default=256, help="held-out samples")
    parser.add_argument("--threads", type=int, default=2, help="torch threads while exporting and calibrating")
    parser.add_argument("--top", type=int, default=12, help="activation tensors listed")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="int8-noise-") as tmp:
        res = measure(args.model, args.samples, args.threads, Path(tmp), log=lambda m: print(m, file=sys.stderr))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "int8_noise" if args.model == "efficientnet" else f"int8_noise_{args.model}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    text = markdown(res, args.top)
    (out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
