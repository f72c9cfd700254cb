"""Latency measurement shared by the build (a quick benchmark for the manifest) and benchmarks/."""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable, Mapping

import numpy as np


def time_calls(fn: Callable[[], Any], warmup: int = 5, runs: int = 50) -> dict[str, float]:
    """Wall time of ``fn()`` in milliseconds: median, p90, mean, min over ``runs`` after ``warmup``."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    arr = np.asarray(samples)
    return {"median_ms": float(np.median(arr)), "p90_ms": float(np.percentile(arr, 90)),
            "mean_ms": float(arr.mean()), "min_ms": float(arr.min()), "runs": runs, "warmup": warmup}


def bench_runner(runner: Any, feed: Mapping[str, np.ndarray], warmup: int, runs: int) -> dict[str, float]:
    runner.infer(feed)  # checks the feed once; timing then goes through the unchecked path
    return time_calls(lambda: runner._infer_impl(feed), warmup, runs)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover - not Linux
        pass
    return info
