#!/usr/bin/env python3
"""What the sweep executors cost, in one run: the same sweep (the digits CNN and the streaming GRU x ort, openvino x
fp32, int8: 8 build-validate-bench jobs) on the local executor at 1 and 2 workers and on a local Ray cluster (a head
with 2 CPUs on 127.0.0.1), each from an empty results folder, plus each executor's round trip for a job that does
nothing (submit it, get its result), the scheduling overhead a job pays.

Each configuration runs `--repeats` times (default 2) in turn, so that machine drift hits all alike; the table gives
every wall time, and a ratio only where the runs of the two do not overlap.

Writes benchmarks/results/sweep.{json,md}.

    python benchmarks/sweep.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("EDGEEXPORT_NO_PROGRESS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"

SWEEP = """
models:
  - name: digits
    model: edgeexport.models.digits:model
    calib: {digits}
  - name: streaming
    model: edgeexport.models.streaming:model
    calib: {stream}
targets: [ort, openvino]
precisions: [fp32, int8]
bench: {{runs: 50, warmup: 5, threads: 1}}
"""


def noop() -> int:
    return 0


def roundtrip(submit, get, n: int = 50) -> float:
    """Median seconds to submit a job that does nothing and collect its result (after one warm-up)."""
    get(submit())
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        get(submit())
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def run_sweep(path: Path, out: Path, executor) -> dict:
    from edgeexport import sweep as sw

    shutil.rmtree(out, ignore_errors=True)
    plan = sw.load_sweep(path, str(out))
    t0 = time.perf_counter()
    report = sw.run(plan, executor, lambda _m: None)
    wall = time.perf_counter() - t0
    bad = [j["job"] for j in report["jobs"] if j["status"] != "passed"]
    if bad:
        raise SystemExit(f"jobs did not pass: {bad}")
    return {"wall_s": wall, "build_s_sum": sum(j["build_s"] or 0 for j in report["jobs"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from edgeexport import sweep as sw
    from edgeexport.bench import machine
    from edgeexport.models.digits import write_calibration as digits_data
    from edgeexport.models.streaming import write_calibration as stream_data

    work = Path(tempfile.mkdtemp(prefix="edgeexport-sweep-bench-"))
    path = work / "sweep.yaml"
    path.write_text(SWEEP.format(digits=digits_data(work / "digits.npz"), stream=stream_data(work / "stream.npz")))
    ray_bin = str(Path(sys.executable).parent / "ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, capture_output=True)
    results: dict = {"local-1": [], "local-2": [], "ray": []}
    overhead = {}
    try:
        for _ in range(args.repeats):
            for name in results:
                executor = (sw.RayExecutor(f"127.0.0.1:{port}") if name == "ray"
                            else sw.LocalExecutor(int(name.split("-")[1])))
                try:
                    results[name].append(run_sweep(path, work / name, executor))
                finally:
                    executor.close()
                print(f"{name}: {results[name][-1]['wall_s']:.1f} s", flush=True)
        pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
        overhead["local"] = roundtrip(lambda: pool.submit(noop), lambda f: f.result())
        pool.shutdown()
        ray_exec = sw.RayExecutor(f"127.0.0.1:{port}")
        task = ray_exec.ray.remote(num_cpus=1)(noop)
        overhead["ray"] = roundtrip(lambda: task.remote(), ray_exec.ray.get)
        ray_exec.close()
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    def span(runs):
        walls = [r["wall_s"] for r in runs]
        return min(walls), max(walls)

    lines = ["| executor | wall time per run (s) | sum of build times (s) | vs local-1 |", "|---|---|---|---|"]
    base_lo, base_hi = span(results["local-1"])
    for name, runs in results.items():
        lo, hi = span(runs)
        ratio = "-" if name == "local-1" else (f"{base_lo / hi:.2f}x to {base_hi / lo:.2f}x faster" if hi < base_lo
                                               else ("slower" if lo > base_hi else "within the spread"))
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
        builds = ", ".join(f"{r['build_s_sum']:.1f}" for r in runs)
        lines.append(f"| {name} | {walls} | {builds} | {ratio} |")
    lines += ["", f"Round trip of a job that does nothing (median of 50): local pool {overhead['local'] * 1e3:.2f} ms, "
              f"Ray task {overhead['ray'] * 1e3:.2f} ms."]
    m = machine()
    md = ["# Sweep executors", "", f"{time.strftime('%Y-%m-%d')}, {m.get('cpu', '?')}, {m.get('cpu_count', '?')} CPUs; "
          "8 jobs (digits CNN and streaming GRU x ort, openvino x fp32, int8), build + validate + bench (50 runs, "
          "1 thread) each, from an empty results folder.", "", *lines, ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sweep.md").write_text("\n".join(md))
    (RESULTS / "sweep.json").write_text(json.dumps({"runs": results, "roundtrip_s": overhead, "machine": m},
                                                   indent=2))
    print("\n".join(md))


if __name__ == "__main__":
    main()
