#!/usr/bin/env python3
"""PyTorch eager fp32 vs every ORT and TFLite precision, measured side by side in one run.

For each model: build a bundle per target and precision with edgeexport (validated as usual), then time eager
PyTorch and each bundle through its own loader (what a device runs) on the same held-out sample, interleaving
rounds so drift hits all of them alike. Writes benchmarks/results/targets_vs_eager.{json,md} and prints the
table. Ratios are what to read: absolute milliseconds depend on the machine.

    python benchmarks/targets_vs_eager.py [--rounds 5] [--runs 200] [--threads 2]
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
VARIANTS = [("ort", p) for p in ("fp32", "fp16", "int8-dynamic", "int8")] + \
    [("tflite", p) for p in ("fp32", "fp16", "dynamic-range", "int8")]
MODELS = {  # name: factory, data module, input, static input for TFLite, TFLite precisions it converts to
    "digits-cnn": ("edgeexport.models.digits:model", "edgeexport.models.digits", "image", None,
                   ("fp32", "fp16", "dynamic-range", "int8")),
    "digit-rows-transformer": ("edgeexport.models.digit_rows:model", "edgeexport.models.digit_rows", "rows",
                               "rows:1x8x8:float32", ("fp32", "fp16", "dynamic-range")),  # int8: not full-integer
}


def torch_size(module) -> int:
    import torch

    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


def bench_model(name: str, args, workdir: Path) -> list[dict]:
    import importlib

    import torch

    from edgeexport import pipeline
    from edgeexport.bench import time_calls
    from edgeexport.bundle import loader
    from edgeexport.config import make_config, parse_input_spec
    from edgeexport.source import load_source

    spec, data_module, input_name, static_input, tflite_ok = MODELS[name]
    data = importlib.import_module(data_module).write_calibration(workdir / f"{name}.npz")
    source = load_source(spec)
    x = np.load(data)[input_name][:1]
    feed = {input_name: x}
    models, sizes, validation = {}, {}, {}
    for target, precision in VARIANTS:
        if target == "tflite" and precision not in tflite_ok:
            continue
        cfg = {"model": spec, "target": target, "precision": precision, "bench": {"enabled": False},
               "out": str(workdir / f"{name}-{target}-{precision}"), "calibration": {"path": str(data)}}
        if target == "tflite" and static_input:
            cfg["inputs"] = [parse_input_spec(static_input).model_dump()]
        result = pipeline.build(make_config(cfg), log=lambda _m: None)
        key = f"{target} {precision}"
        models[key] = loader.load(result.out, threads=args.threads)
        sizes[key] = (result.out / result.manifest["model_file"]).stat().st_size
        validation[key] = result.report.to_dict()
    torch.set_num_threads(args.threads)
    module = source.module
    tx = torch.from_numpy(x)

    def eager():
        with torch.inference_mode():
            module(tx)

    timings: dict[str, list[float]] = {k: [] for k in ("eager-fp32", *models)}
    for _ in range(args.rounds):  # interleaved rounds
        timings["eager-fp32"].append(time_calls(eager, warmup=20, runs=args.runs)["median_ms"])
        for key, model in models.items():
            timings[key].append(time_calls(lambda m=model: m._backend.run(feed), warmup=20, runs=args.runs)["median_ms"])
    eager_ms = float(np.median(timings["eager-fp32"]))
    eager_size = torch_size(module)
    rows = [{"model": name, "variant": "pytorch eager fp32", "median_ms": eager_ms, "speedup": 1.0,
             "size_bytes": eager_size, "size_ratio": 1.0, "cosine": None, "top1": None, "task_drop_points": None}]
    for key in models:
        ms = float(np.median(timings[key]))
        out = next(iter(validation[key]["outputs"].values()))
        task = validation[key].get("task") or {}
        rows.append({"model": name, "variant": key, "median_ms": ms, "speedup": eager_ms / ms,
                     "size_bytes": sizes[key], "size_ratio": sizes[key] / eager_size,
                     "cosine": out["cosine"], "top1": out.get("top1"), "task_drop_points": task.get("drop_points")})
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# ORT and TFLite vs PyTorch eager (batch 1, {meta['threads']} threads, median of {meta['rounds']} rounds x "
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
        for name in MODELS:
            print(f"benchmarking {name} ...", file=sys.stderr)
            rows += bench_model(name, args, Path(tmp))
    meta = {"threads": args.threads, "rounds": args.rounds, "runs": args.runs, "machine": machine(), "versions": versions()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "targets_vs_eager.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = markdown(rows, meta)
    (out / "targets_vs_eager.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
