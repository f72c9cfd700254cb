"""Latency, throughput, memory and cold-start measurement.

Shared by the build (a quick benchmark for the manifest), `edgeexport bench BUNDLE`, `edgeexport compare` and
benchmarks/. Everything is measured through the bundle's own loader, the code a device runs.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from edgeexport.errors import BundleError, UsageError
from edgeexport.targets import DEFAULT_TARGET


def sample_latency(fn: Callable[[], Any], warmup: int = 5, runs: Optional[int] = 50,
                   duration_s: Optional[float] = None) -> list[float]:
    """Milliseconds per call of ``fn()`` after ``warmup`` calls: ``runs`` calls, or as many as fit in ``duration_s``."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    deadline = time.perf_counter() + duration_s if duration_s else None
    while (len(samples) < (runs or 1)) if deadline is None else (time.perf_counter() < deadline or not samples):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def summarize(samples: list[float]) -> dict[str, Any]:
    arr = np.asarray(samples, dtype=np.float64)
    p50, p90, p99 = (float(v) for v in np.percentile(arr, [50, 90, 99]))
    return {"p50_ms": p50, "median_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(arr.mean()),
            "min_ms": float(arr.min()), "max_ms": float(arr.max()), "std_ms": float(arr.std()), "runs": len(samples)}


#: interleaved timing rounds of the build's own benchmark (reference, built, reference, built, ...)
BUILD_ROUNDS = 3
#: a variant's p90/p50 above this says its calls were interrupted (a busy machine), not that it is slow. Sub-ms
#: calls show p90/p50 of 1.5-1.8 on an idle machine (timer and interrupt jitter), so the line is well above that
NOISY_P90_P50 = 3.0
#: a variant's per-round medians, or the per-round speed-ups, differing by more than this: no ratio holds
NOISY_ROUNDS = 2.0
#: per-round speed-ups differing by more than this: the ratio is printed with its range
WIDE_ROUNDS = 1.25


def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a container's
    ``--cpus``). torch and some runtimes default to every core of the host, which thrashes in a container."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def resolve_threads(threads: Optional[int]) -> int:
    """The thread count every timed side uses (the reference included): the one asked for, else
    :func:`available_cpus`."""
    return int(threads) if threads else available_cpus()


def set_torch_threads(threads: int) -> None:
    """PyTorch's intra-op threads (when torch is loaded at all): the reference runs with the same count as the
    runtimes it is compared with."""
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)


def interleaved(fns: Mapping[str, Callable[[], Any]], warmup: int, runs: int, rounds: int,
                log: Optional[Callable[[str], None]] = None) -> dict[str, dict[str, Any]]:
    """Time each ``fn`` in ``rounds`` interleaved rounds of ``warmup`` + ``runs`` calls (a machine that gets busy
    for a while slows every variant alike, and shows as round-to-round spread). Each summary has
    ``round_p50_ms`` and, where the calls were noisy, ``noisy`` saying why."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    medians: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        if log:
            log(f"==> timing round {r + 1}/{rounds}: {len(fns)} variants x {runs} runs")
        for key, fn in fns.items():
            got = sample_latency(fn, warmup, runs)
            samples[key] += got
            medians[key].append(float(np.median(got)))
    out = {}
    for key in fns:
        summary = dict(summarize(samples[key]), round_p50_ms=medians[key])
        if why := noise(summary):
            summary["noisy"] = why
        out[key] = summary
    return out


def noise(summary: Mapping[str, Any]) -> Optional[str]:
    """Why one variant's timing cannot be taken at face value, or None."""
    why = []
    spread = summary["p90_ms"] / max(summary["p50_ms"], 1e-12)
    if spread > NOISY_P90_P50:
        why.append(f"p90 is {spread:.2f}x p50")
    rounds = [r for r in summary.get("round_p50_ms") or [] if r > 0]
    if len(rounds) > 1 and max(rounds) / min(rounds) > NOISY_ROUNDS:
        why.append(f"round medians differ {max(rounds) / min(rounds):.2f}x")
    return "; ".join(why) or None


def speedup(reference: Mapping[str, Any], built: Mapping[str, Any]) -> dict[str, Any]:
    """The reference's p50 over the built one's, the same per round, whether the spread supports a ratio at all
    (``supported``; ``noise`` says why not) and, where the rounds disagree by more than :data:`WIDE_ROUNDS`, the
    range they span (``range``: print it with the ratio)."""
    ratio = reference["p50_ms"] / max(built["p50_ms"], 1e-12)
    by_round = [a / b for a, b in zip(reference.get("round_p50_ms") or [], built.get("round_p50_ms") or []) if b > 0]
    why = [f"{side}: {n}" for side, n in (("reference", noise(reference)), ("built", noise(built))) if n]
    spread = max(by_round) / min(by_round) if len(by_round) > 1 and min(by_round) > 0 else 1.0
    if spread > NOISY_ROUNDS:
        why.append(f"the speed-up ranged {min(by_round):.3g}-{max(by_round):.3g}x between rounds")
    return {"speedup": ratio, "speedup_by_round": by_round, "supported": not why, "noise": "; ".join(why) or None,
            "range": [min(by_round), max(by_round)] if spread > WIDE_ROUNDS else None}


def format_speedup(info: Optional[Mapping[str, Any]]) -> str:
    """``7.15x``; ``4.5-6.6x`` (the per-round speed-ups' range: what the spread supports) where the rounds
    disagree; ``noisy`` where it supports no ratio (the reason goes in a note)."""
    if not info or info.get("speedup") is None:
        return "-"
    if not info.get("supported", True):
        return "noisy"
    lo_hi = info.get("range")
    return f"{info['speedup']:.2f}x" if not lo_hi else f"{lo_hi[0]:.2g}-{lo_hi[1]:.2g}x"


def time_calls(fn: Callable[[], Any], warmup: int = 5, runs: int = 50) -> dict[str, float]:
    """Wall time of ``fn()`` in milliseconds: p50 (= median), p90, p99, mean, min over ``runs`` after ``warmup``."""
    return dict(summarize(sample_latency(fn, warmup, runs)), warmup=warmup)


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


def runtime_versions() -> dict[str, str]:
    """Installed versions of numpy, torch, onnxruntime and the packages each target runs its bundles with (only
    those present)."""
    from edgeexport.targets import all_targets

    found = {}
    packages = ["numpy", "onnxruntime", *(p for t in all_targets() for p in t.runtime_packages), "torch"]
    for name in dict.fromkeys(packages):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def batched_feed(inputs: list[dict], golden: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The first golden input repeated to ``batch`` rows; refuses inputs whose batch dimension is fixed."""
    feed = {}
    for spec in inputs:
        x = golden[spec["name"]]
        fixed_batch(spec, batch)
        feed[spec["name"]] = np.ascontiguousarray(np.repeat(x[:1], batch, axis=0)) if batch != 1 else x
    return feed


def fixed_batch(spec: Mapping[str, Any], batch: int) -> None:
    """Refuse ``batch`` rows for an input whose batch dimension was fixed at build time."""
    first = spec["shape"][0] if spec["shape"] else None
    if batch != 1 and not isinstance(first, str) and first != batch:
        raise UsageError(f"--batch {batch}: input {spec['name']!r} has a fixed batch dimension "
                         f"(shape {spec['shape']})", "the bundle was built for that shape only",
                         "benchmark it with --batch 1, or rebuild with a named batch dimension "
                         f"(e.g. --input {spec['name']}:batchx...)")


# Runs in a fresh interpreter: imports only the loader file (numpy + the runtime, as on a device), loads the bundle,
# runs it, and reports when the first result was ready (wall clock) and the process's peak resident memory.
_CHILD = r"""
import importlib.util, json, resource, sys, time
t_start = time.time()
loader_path, bundle, batch, threads, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
options = json.loads(sys.argv[6])
spec = importlib.util.spec_from_file_location("edgeexport_bundle_loader", loader_path)
loader = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loader)
import numpy as np
t_import = time.time()
model = loader.load(bundle, threads=int(threads) if threads else None, **options)
t_load = time.time()
golden = next(model.golden())[0]
feed = {k: (np.repeat(v[:1], batch, axis=0) if batch != 1 else v) for k, v in golden.items()}
model(feed)
t_first = time.time()
for _ in range(runs):
    model(feed)
# VmHWM is this process's own peak; ru_maxrss also counts the parent's memory at fork/exec on Linux
try:
    peak = int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:")))
except (OSError, StopIteration, ValueError):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"t_start": t_start, "t_import": t_import, "t_load": t_load, "t_first": t_first,
                  "peak_rss_kib": peak}))
"""


def _loader_file(bundle: Path, target: str, tmp: Path) -> Path:
    """The bundle's own loader.py (a folder), or the one its target assembles (an archive)."""
    if (bundle / "loader.py").is_file():
        return bundle / "loader.py"
    from edgeexport.bundle.writer import assemble_loader
    from edgeexport.targets import get_target

    path = tmp / "loader.py"
    path.write_text(assemble_loader(get_target(target).loader_backend()), encoding="utf-8")
    return path


def fresh_process(bundle: Path, batch: int, threads: Optional[int], runs: int = 10,
                  timeout_s: int = 600, target: str = DEFAULT_TARGET, options: Optional[dict[str, Any]] = None
                  ) -> dict[str, float]:
    """Cold start (process start -> first result) and peak resident memory of a new process running the bundle
    through the loader a device would run."""
    import tempfile

    t0 = time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="edgeexport-loader-") as tmp:
            loader_file = _loader_file(bundle, target, Path(tmp))
            proc = subprocess.run([sys.executable, "-c", _CHILD, str(loader_file), str(bundle), str(batch),
                                   str(threads or ""), str(runs), json.dumps(options or {})],
                                  capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BundleError(f"a fresh process running bundle {str(bundle)!r} did not finish in {timeout_s} s", "",
                          "skip the cold-start measurement with --cold-runs 0") from None
    if proc.returncode != 0:
        raise BundleError(f"a fresh process could not run bundle {str(bundle)!r}",
                          (proc.stderr.strip().splitlines() or ["no output"])[-1],
                          f"check it with 'edgeexport verify {bundle}'")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"cold_start_ms": (r["t_first"] - t0) * 1e3, "interpreter_start_ms": (r["t_start"] - t0) * 1e3,
            "import_ms": (r["t_import"] - r["t_start"]) * 1e3, "load_ms": (r["t_load"] - r["t_import"]) * 1e3,
            "first_result_ms": (r["t_first"] - r["t_load"]) * 1e3, "peak_rss_mib": r["peak_rss_kib"] / 1024}


def _bundle_bytes(manifest: dict) -> dict[str, int]:
    files = manifest.get("files", [])
    model = set(manifest.get("model_files") or [manifest["model_file"]])
    return {"model_file_bytes": sum(f.get("size", 0) for f in files if f.get("path") in model),
            "bundle_bytes": sum(f.get("size", 0) for f in files)}


def bench_bundle(bundle: Path, warmup: int = 10, runs: Optional[int] = 100, duration_s: Optional[float] = None,
                 threads: Optional[int] = None, batch: int = 1, cold_runs: int = 3,
                 log: Callable[[str], None] = lambda _m: None, **options: Any) -> dict[str, Any]:
    """Measure a bundle through its loader; the result records the protocol next to the numbers. ``options``
    go to the loader's backend (TensorRT's ``runtime='onnxruntime'`` on a machine without TensorRT)."""
    from edgeexport.bundle import loader

    if batch < 1 or (runs is not None and runs < 1) or warmup < 0 or cold_runs < 0:
        raise UsageError("--batch and --runs must be at least 1, --warmup and --cold-runs at least 0")
    if duration_s is not None and not 0 < duration_s <= 86400:
        raise UsageError(f"--duration {duration_s:g} is not a time budget", "it must be more than 0 s (and at most a day)",
                         "e.g. --duration 10, or --runs N")
    threads = resolve_threads(threads)
    if not bundle.exists():
        raise BundleError(f"bundle {str(bundle)!r} does not exist", "", "check the path (a bundle folder, or its "
                          ".tar.gz/.zip archive)")
    try:
        root = loader.extract_archive(bundle) if loader.is_archive(bundle) else bundle
        options = loader.timing_options(loader.read_manifest(root), options)
        model = loader.load(root, threads=threads, **options)
    except loader.BundleError as e:
        raise BundleError(f"cannot load bundle {str(bundle)!r}", str(e),
                          f"check it with 'edgeexport verify {bundle}'") from None
    manifest = model.manifest
    feed = batched_feed(model.inputs, next(model.golden())[0], batch)
    model(feed)  # checks the feed once; the timed calls go straight to the runtime
    what = f"{duration_s:g} s" if duration_s else f"{runs} runs"
    log(f"==> latency: {warmup} warm-up calls, then {what} at batch {batch}")
    lat = summarize(sample_latency(lambda: model._backend.run(feed), warmup, runs, duration_s))
    if why := noise(lat):
        lat["noisy"] = why
    result: dict[str, Any] = {
        "bundle": str(bundle), "target": manifest["target"], "precision": manifest["precision"],
        "precision_label": manifest.get("precision_label"), "latency": lat,
        "throughput_per_s": batch * 1e3 / lat["mean_ms"],
        **_bundle_bytes(manifest),
        "protocol": {"warmup": warmup, "runs": lat["runs"], "duration_s": duration_s, "threads": threads,
                     "runtime_options": {k: v for k, v in options.items() if v is not None}, "batch": batch, "feed_shapes": {k: list(v.shape) for k, v in feed.items()},
                     "feed": "first golden input of the bundle", "timed": "runtime call (inputs checked once before)",
                     "cold_runs": cold_runs, "machine": machine(), "versions": runtime_versions(),
                     "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    flops = (manifest.get("model_stats") or {}).get("flops_per_sample")
    if flops:
        result["gflops_per_s"] = flops * batch / (lat["mean_ms"] * 1e6)
    if manifest.get("generation"):
        result["generation"] = bench_generation(model, warmup, runs, log)
    if cold_runs:
        log(f"==> cold start and peak memory: {cold_runs} fresh processes")
        colds = [fresh_process(Path(bundle), batch, threads, target=manifest["target"], options=options)
                 for _ in range(cold_runs)]
        result["fresh_process"] = {k: float(np.median([c[k] for c in colds])) for k in colds[0]}
        result["fresh_process"]["cold_start_ms_all"] = [c["cold_start_ms"] for c in colds]
    return result


#: decode steps per timed call of a decoder bundle's benchmark
DECODE_STEPS = 32


def decoder_calls(dec: Any, prompt: list[int], steps: int) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """The two timed calls of a KV-cache decoder (the loader's ``KVDecoder``): the prefill of ``prompt`` (the time
    to first token) and ``steps`` greedy decode steps from that prompt's cache. bench, compare and
    benchmarks/decoder.py all time these."""
    ids = np.asarray([prompt])
    logits, past0 = dec.step(ids, dec.empty())
    first = logits[:, -1].argmax(-1)[:, None]

    def prefill() -> Any:
        return dec.step(ids, dec.empty())

    def decode() -> None:
        past, token = past0, first
        for _ in range(steps):
            out, past = dec.step(token, past)
            token = out[:, -1].argmax(-1)[:, None]

    return prefill, decode


def bench_generation(model: Any, warmup: int, runs: Optional[int], log: Callable[[str], None]) -> dict[str, Any]:
    """A decoder bundle through its loader's KV-cache decoder: the prefill of its first golden prompt (the time to
    first token) and ``DECODE_STEPS`` decode steps from that prompt's cache, timed in turn."""
    dec = model.decoder()
    prompt = list(model.manifest["generation"]["golden"][0]["prompt_ids"])
    steps = max(1, min(DECODE_STEPS, (dec.context or 1 << 30) - len(prompt) - 1))
    prefill_call, decode_call = decoder_calls(dec, prompt, steps)
    n = max(5, (runs or 50) // 5)
    log(f"==> generation: prefill of {len(prompt)} tokens, then {steps} decode steps, {n} timed calls each")
    prefill = summarize(sample_latency(prefill_call, min(warmup, 3), n))
    decoding = summarize(sample_latency(decode_call, min(warmup, 2), n))
    return {"prompt_tokens": len(prompt), "decode_steps": steps, "ttft_ms": prefill["p50_ms"],
            "prefill_tokens_per_s": len(prompt) * 1e3 / prefill["p50_ms"],
            "decode_tokens_per_s": steps * 1e3 / decoding["p50_ms"], "prefill": prefill, "decode": decoding,
            "noisy": "; ".join(w for w in (noise(prefill), noise(decoding)) if w) or None}


def bench_grid(bundle: Path, batches: list[int], threads: list[Optional[int]], cold_runs: int = 3,
               log: Callable[[str], None] = lambda _m: None, **kw: Any) -> dict[str, Any]:
    """``bench_bundle`` at every threads x batch combination, so what batching and threads buy on this device shows
    in one table. Every fixed batch dimension is refused before anything is timed; cold start and peak memory
    are measured once (at the first combination)."""
    from edgeexport.bundle import loader

    try:
        inputs = loader.read_manifest(loader.extract_archive(bundle) if loader.is_archive(bundle) else bundle)["inputs"]
    except (loader.BundleError, OSError):
        inputs = []  # bench_bundle below says what is wrong with the bundle
    for spec in inputs:
        for b in batches:
            fixed_batch(spec, b)
    rows = []
    for i, t in enumerate(threads):
        for j, b in enumerate(batches):
            log(f"==> threads {t or 'default'}, batch {b}")
            rows.append(bench_bundle(bundle, threads=t, batch=b, cold_runs=cold_runs if i == j == 0 else 0, log=log,
                                     **kw))
    return {"bundle": str(bundle), "grid": rows}


def render_grid(g: dict[str, Any]) -> str:
    """The grid as a table: latency per call and per sample, throughput at the median and at the p90 latency (the
    pair is the spread a comparison between rows has to clear)."""
    first = g["grid"][0]
    lines = [render_bench(first), "", "threads x batch (throughput = batch / latency; the p90 column is what a "
             "slow call gives: read a difference between rows only where it exceeds both columns' gap)", "",
             f"{'threads':>7}  {'batch':>5}  {'p50 ms':>9}  {'p90 ms':>9}  {'ms/sample':>9}  "
             f"{'samples/s':>10}  {'at p90':>10}  note"]
    for r in g["grid"]:
        lat, p = r["latency"], r["protocol"]
        lines.append(f"{str(p['threads'] or 'default'):>7}  {p['batch']:>5}  {lat['p50_ms']:>9.4g}  {lat['p90_ms']:>9.4g}  "
                     f"{lat['p50_ms'] / p['batch']:>9.4g}  {p['batch'] * 1e3 / lat['p50_ms']:>10.1f}  "
                     f"{p['batch'] * 1e3 / lat['p90_ms']:>10.1f}  {'noisy' if lat.get('noisy') else ''}")
    return "\n".join(lines)


def render_bench(r: dict[str, Any]) -> str:
    lat, p = r["latency"], r["protocol"]
    lines = [f"bundle:      {r['bundle']} ({r['target']} / {r.get('precision_label') or r['precision']})",
             f"size:        model file {r['model_file_bytes'] / 1024:.1f} KiB, bundle {r['bundle_bytes'] / 1024:.1f} KiB",
             f"latency:     p50 {lat['p50_ms']:.4g} ms, p90 {lat['p90_ms']:.4g} ms, p99 {lat['p99_ms']:.4g} ms, "
             f"mean {lat['mean_ms']:.4g} ms (min {lat['min_ms']:.4g})",
             f"throughput:  {r['throughput_per_s']:.1f} samples/s at batch {p['batch']}"]
    if lat.get("noisy"):
        lines.append(f"warning:     noisy timing ({lat['noisy']}): the machine was busy or the calls vary; rerun on "
                     "an idle machine before comparing these numbers")
    if (p.get("runtime_options") or {}).get("runtime"):
        lines.append(f"runtime:     {p['runtime_options']['runtime']} (asked with --runtime; not the bundle's own "
                     "runtime, so these are not its device's numbers)")
    if "gflops_per_s" in r:
        lines.append(f"compute:     {r['gflops_per_s']:.2f} GFLOP/s achieved (model FLOPs / mean latency)")
    g = r.get("generation")
    if g:
        lines.append(f"generation:  time to first token {g['ttft_ms']:.3g} ms ({g['prompt_tokens']}-token prompt, "
                     f"{g['prefill_tokens_per_s']:,.0f} tokens/s prefill); decode {g['decode_tokens_per_s']:,.0f} "
                     f"tokens/s (p50 of {g['decode_steps']} steps from the prompt's KV cache); the latency above is "
                     "one prefill call" + (f"; noisy: {g['noisy']}" if g.get("noisy") else ""))
    fp = r.get("fresh_process")
    if fp:
        lines += [f"cold start:  {fp['cold_start_ms']:.0f} ms process start -> first result (median of {p['cold_runs']}: "
                  f"interpreter {fp['interpreter_start_ms']:.0f}, loader + numpy import {fp['import_ms']:.0f}, load "
                  f"{fp['load_ms']:.0f}, first call {fp['first_result_ms']:.0f})",
                  f"peak memory: {fp['peak_rss_mib']:.1f} MiB resident (fresh process that loads and runs the bundle)"]
    m = p["machine"]
    lines.append(f"protocol:    {p['warmup']} warm-up, {p['runs']} timed runs, threads {p['threads'] or 'default'} (--threads; default: the CPUs this process may use), "
                 f"batch {p['batch']}; {m.get('cpu', m['machine'])} ({m['cpu_count']} cores); "
                 + ", ".join(f"{k} {v}" for k, v in p["versions"].items()))
    return "\n".join(lines)
