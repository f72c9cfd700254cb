#!/usr/bin/env python3
"""PyTorch eager fp32 vs every ORT precision, measured side by side in one run.

For each model: build a bundle per precision with edgeexport (validated as usual), then time eager PyTorch and
each bundle's ORT session on the same held-out sample, interleaving rounds so drift hits all of them alike.
Writes benchmarks/results/ort_vs_eager.{json,md} and prints the table. Ratios are what to read: absolute
milliseconds depend on the machine.

    python benchmarks/ort_vs_eager.py [--rounds 5] [--runs 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGEEXPORT_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parent
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8")
MODELS = {
    "digits-cnn": ("edgeexport.models.digits:model", "edgeexport.models.digits", "image"),
    "digit-rows-transformer": ("edgeexport.models.digit_rows:model", "edgeexport.models.digit_rows", "rows"),
}


def torch_size(module) -> int:
    import torch

    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


def bench_model(name: str, spec: str, data_module: str, input_name: str, args, workdir: Path) -> list[dict]:
    import importlib

    import torch

    from edgeexport import pipeline
    from edgeexport.bench import time_calls
    from edgeexport.config import make_config
    from edgeexport.source import load_source
    from edgeexport.targets.onnxruntime import OrtRunner

    mod = importlib.import_module(data_module)
    data = mod.write_calibration(workdir / f"{name}.npz")
    source = load_source(spec)
    x = np.load(data)[input_name][:1]
    feed = {input_name: x}
    runners, sizes, validation = {}, {}, {}
    for precision in PRECISIONS:
        cfg = make_config({"model": spec, "precision": precision, "out": str(workdir / f"{name}-{precision}"),
                           "calibration": {"path": str(data)}, "bench": {"enabled": False}})
        result = pipeline.build(cfg, log=lambda _m: None)
        path = result.out / result.manifest["model_file"]
        runners[precision] = OrtRunner(str(path), threads=args.threads)
        sizes[precision] = path.stat().st_size
        validation[precision] = result.report.to_dict()
    torch.set_num_threads(args.threads)
    module = source.module
    tx = torch.from_numpy(x)

    def eager():
        with torch.inference_mode():
            module(tx)

    timings: dict[str, list[float]] = {k: [] for k in ("eager-fp32", *PRECISIONS)}
    for _ in range(args.rounds):  # interleaved rounds
        timings["eager-fp32"].append(time_calls(eager, warmup=20, runs=args.runs)["median_ms"])
        for precision, runner in runners.items():
            timings[precision].append(time_calls(lambda r=runner: r._infer_impl(feed), warmup=20, runs=args.runs)["median_ms"])
    eager_ms = float(np.median(timings["eager-fp32"]))
    eager_size = torch_size(module)
    rows = [{"model": name, "variant": "pytorch eager fp32", "median_ms": eager_ms, "speedup": 1.0,
             "size_bytes": eager_size, "size_ratio": 1.0, "cosine": None, "top1": None, "task_drop_points": None}]
    for precision in PRECISIONS:
        ms = float(np.median(timings[precision]))
        out = next(iter(validation[precision]["outputs"].values()))
        task = validation[precision].get("task") or {}
        rows.append({"model": name, "variant": f"ort {precision}", "median_ms": ms, "speedup": eager_ms / ms,
                     "size_bytes": sizes[precision], "size_ratio": sizes[precision] / eager_size,
                     "cosine": out["cosine"], "top1": out.get("top1"), "task_drop_points": task.get("drop_points")})
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# ORT vs PyTorch eager (batch 1, {meta['threads']} threads, median of {meta['rounds']} rounds x "
             f"{meta['runs']} runs)", "", f"Machine: {meta['machine'].get('cpu', meta['machine']['machine'])}, "
             f"{meta['machine']['cpu_count']} cores. Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), "",
             "| model | variant | median ms | speed-up vs eager | size KiB | size vs eager | cosine | top-1 agree | task drop (pts) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        lines.append(f"| {r['model']} | {r['variant']} | {r['median_ms']:.4f} | {r['speedup']:.2f}x | "
                     f"{r['size_bytes'] / 1024:.1f} | {r['size_ratio']:.2f} | {f(r['cosine'], '.5f')} | "
                     f"{f(r['top1'], '.3f')} | {f(r['task_drop_points'], '+.2f')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    from edgeexport.bench import machine
    from edgeexport.bundle.manifest import versions

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (spec, data_module, input_name) in MODELS.items():
            print(f"benchmarking {name} ...", file=sys.stderr)
            rows += bench_model(name, spec, data_module, input_name, args, Path(tmp))
    meta = {"threads": args.threads, "rounds": args.rounds, "runs": args.runs, "machine": machine(), "versions": versions()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ort_vs_eager.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = markdown(rows, meta)
    (out / "ort_vs_eager.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
