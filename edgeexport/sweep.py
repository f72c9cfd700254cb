"""`edgeexport sweep SWEEP.yaml`: models x targets x precisions, each combination one job, local or on Ray.

A job is exactly what ``edgeexport build`` does (the same ``pipeline.build``, the same manifest), then, where the
sweep asks for it, ``edgeexport bench`` on the bundle (the same ``bench.bench_bundle``). Jobs run through an
executor:

- ``local`` (default): a process pool sized to the machine, no extra dependency;
- ``ray``: each build is a Ray task (a target's ``runtime_env`` may pin its own packages); a bench that must run on
  a device kind (``bench_on: jetson_orin``) is a second task asking for that Ray custom resource, so it runs only
  on nodes started with ``ray start --resources='{"jetson_orin": 1}'``.

Bundles come back to the driver as bytes of a .tar.gz (never pickled objects) and are unpacked with the loader's
own archive checks into ``OUT/<job key>/bundle``, verified against their checksums, and moved into place atomically.
A job's key hashes its resolved build config, the model's content and the data's; a rerun skips every job whose
bundle (or recorded refusal) is there and verifies, so a killed sweep resumes where it stopped. A job that fails
validation or breaks is a FAILED or ERROR row with its message, never the end of the sweep.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from edgeexport.errors import ConfigError, EdgeExportError, ValidationFailed

Log = Callable[[str], None]
SWEEP_KEYS = {"out", "models", "targets", "precisions", "bench", "bench_on", "runtime_env"}
MODEL_KEYS = {"name", "model", "calib", "val", "labels", "options"}


@dataclass
class Job:
    model: str  # the model entry's name
    target: str
    precision: str
    config: dict[str, Any]  # the build config's data (make_config input), out and force excluded
    key: str = ""
    bench_on: Optional[str] = None  # a Ray custom resource the bench must run on
    status: str = "pending"  # passed | failed | error | cached-passed | cached-failed
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    bench: Optional[dict[str, Any]] = None
    build_s: Optional[float] = None
    ran_on: dict[str, Optional[str]] = field(default_factory=dict)  # "build"/"bench" -> node (Ray) or host

    @property
    def name(self) -> str:
        return f"{self.model}/{self.target}/{self.precision}"

    def row(self) -> dict[str, Any]:
        lat = (self.bench or {}).get("latency") or {}
        return {"job": self.name, "key": self.key, "model": self.model, "target": self.target,
                "precision": self.precision, "status": self.status, "reason": self.reason, "metrics": self.metrics,
                "bench_on": self.bench_on, "latency_ms_p50": lat.get("p50_ms"), "latency_ms_mean": lat.get("mean_ms"),
                "bench": self.bench, "build_s": self.build_s, "ran_on": self.ran_on}


@dataclass
class Sweep:
    out: Path
    jobs: list[Job]
    bench: dict[str, Any]
    runtime_env: dict[str, Any]
    source: str


def load_sweep(path: str | Path, out: Optional[str] = None) -> Sweep:
    """Read SWEEP.yaml into jobs; every mistake in it is a ConfigError naming the entry."""
    from edgeexport.config import load_config_file, make_config

    path = Path(path)
    data = load_config_file(path)
    unknown = set(data) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}", f"a sweep file has {sorted(SWEEP_KEYS)}",
                          "see docs/sweep.md")
    lists: dict[str, list] = {}
    for name in ("models", "targets", "precisions"):
        value = data.get(name)
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{path}: '{name}' must be a non-empty list", f"it is {value!r}", "see docs/sweep.md")
        lists[name] = value
    models, targets, precisions = lists["models"], lists["targets"], lists["precisions"]
    bench = data.get("bench") or {}
    bench_on = data.get("bench_on")
    if bench_on is not None and not isinstance(bench_on, (str, dict)):
        raise ConfigError(f"{path}: 'bench_on' must be a resource name or {{target: resource}}", f"it is {bench_on!r}",
                          "e.g. bench_on: jetson_orin")
    jobs: list[Job] = []
    names = set()
    for i, m in enumerate(models):
        if not isinstance(m, dict) or "model" not in m:
            raise ConfigError(f"{path}: models[{i}] needs a 'model' (a SPEC, as for --model)", f"it is {m!r}", "")
        bad = set(m) - MODEL_KEYS
        if bad:
            raise ConfigError(f"{path}: models[{i}] has unknown key(s) {sorted(bad)}", f"known: {sorted(MODEL_KEYS)}", "")
        name = str(m.get("name") or m["model"].rpartition(":")[2] or f"model{i}")
        if name in names:
            raise ConfigError(f"{path}: two models are named {name!r}", "names key the results", "give each a name")
        names.add(name)
        for target in targets:
            for precision in precisions:
                cfg = dict(m.get("options") or {})
                cfg.update(model=_resolve_path(m["model"], path.parent), target=target, precision=precision)
                cal = cfg.setdefault("calibration", {})
                for key, field_name in (("calib", "path"), ("val", "validation_path"), ("labels", "labels")):
                    if m.get(key):
                        cal[field_name] = str(_resolve_path(str(m[key]), path.parent))
                if bench:
                    cfg["bench"] = {**cfg.get("bench", {}), **{k: v for k, v in bench.items() if k in ("threads",)}}
                cfg.setdefault("bench", {})["enabled"] = False  # the sweep's bench step times each bundle
                try:
                    make_config({**cfg, "out": "x"}, f"{path}: {name}")
                except EdgeExportError as e:
                    raise ConfigError(f"{path}: {name} x {target}/{precision}: {e.what}", e.why, e.fix) from None
                on = bench_on.get(target) if isinstance(bench_on, dict) else bench_on
                jobs.append(Job(name, target, precision, cfg, bench_on=on))
    root = Path(out or data.get("out") or "sweep")
    return Sweep(root, jobs, {k: bench[k] for k in ("runs", "warmup", "threads") if k in bench},
                 data.get("runtime_env") or {}, str(path))


def _resolve_path(spec: str, base: Path) -> str:
    """Relative file paths in a sweep file are relative to the file (module specs and hf: stay as given)."""
    head, sep, tail = spec.rpartition(":") if spec.count(":") == 1 and spec.split(":")[0].endswith(".py") else (
        spec, "", "")
    candidate = base / head
    if not Path(head).is_absolute() and candidate.exists():
        return str(candidate.resolve()) + (sep + tail if sep else "")
    return spec


# --- keys ----------------------------------------------------------------------------------------------------------

def _hash_path(path: Path, h: Any) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)


def model_hash(spec: str) -> str:
    """The content behind a model spec: the file (or folder) it names, or the source file of a module factory."""
    import importlib.util

    h = hashlib.sha256()
    target = spec.removeprefix("hf:")
    file_part = target.rpartition(":")[0] if ":" in target and not Path(target).exists() else target
    if Path(file_part).exists():
        _hash_path(Path(file_part), h)
    else:
        module = file_part or target
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is not None and found.origin and Path(found.origin).is_file():
            _hash_path(Path(found.origin), h)
    h.update(spec.encode())
    return h.hexdigest()


def job_key(job: Job) -> str:
    """Hash of the resolved build config, the model's content and the data's (a rerun with any of them changed is a
    new job)."""
    from edgeexport.config import make_config

    h = hashlib.sha256()
    resolved = make_config({**job.config, "out": "x"}).model_dump(mode="json")
    resolved.pop("out", None)
    resolved.pop("force", None)
    h.update(json.dumps(resolved, sort_keys=True).encode())
    h.update(model_hash(job.config["model"]).encode())
    for key in ("path", "validation_path", "labels"):
        p = (job.config.get("calibration") or {}).get(key)
        if p and Path(p).exists():
            _hash_path(Path(p), h)
    return h.hexdigest()[:16]


# --- the work of one job (runs in a pool process or a Ray worker) ----------------------------------------------------

def run_build(config_data: dict[str, Any]) -> dict[str, Any]:
    """Build and validate one combination exactly as ``edgeexport build`` does; return its outcome and, when it
    passed, the bundle as .tar.gz bytes."""
    from edgeexport import pipeline
    from edgeexport.config import make_config

    started = time.perf_counter()
    node = _node()
    with tempfile.TemporaryDirectory(prefix="edgeexport-sweep-") as tmp:
        out = Path(tmp) / "bundle"
        try:
            config = make_config({**config_data, "out": str(out), "archive": "tar.gz"})
            result = pipeline.build(config, log=lambda _m: None)
        except ValidationFailed as e:
            return {"status": "failed", "reason": str(e.why), "metrics": _metrics(e.report.to_dict()),
                    "build_s": time.perf_counter() - started, "node": node}
        except EdgeExportError as e:
            return {"status": "error", "reason": f"{e.what}: {e.why}" if e.why else e.what,
                    "build_s": time.perf_counter() - started, "node": node}
        except Exception as e:  # noqa: BLE001 - a broken job is a row, never the end of the sweep
            return {"status": "error", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                    "build_s": time.perf_counter() - started, "node": node}
        archive = (Path(tmp) / "bundle.tar.gz").read_bytes()
        return {"status": "passed", "reason": "", "metrics": _metrics(result.manifest["validation"]),
                "archive": archive, "build_s": time.perf_counter() - started, "node": node}


def run_bench(archive: bytes, settings: dict[str, Any]) -> dict[str, Any]:
    """``edgeexport bench`` on a bundle given as .tar.gz bytes (checked and unpacked like any archive)."""
    from edgeexport.bench import bench_bundle

    with tempfile.TemporaryDirectory(prefix="edgeexport-sweep-bench-") as tmp:
        path = Path(tmp) / "bundle.tar.gz"
        path.write_bytes(archive)
        try:
            result = bench_bundle(path, warmup=int(settings.get("warmup", 10)), runs=int(settings.get("runs", 100)),
                                  threads=settings.get("threads"), cold_runs=0)
        except EdgeExportError as e:
            return {"error": f"{e.what}: {e.why}", "node": _node()}
    result["node"] = _node()
    return result


def _node() -> str:
    """Where this runs: the Ray node id inside a Ray task, else the host name."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            try:
                return str(ray.get_runtime_context().get_node_id())
            except Exception:  # noqa: BLE001 - outside a task
                pass
    import socket

    return socket.gethostname()


def _metrics(validation: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of each output (by its kind), and the task accuracy where labels were given."""
    out: dict[str, Any] = {"passed": validation.get("passed"), "samples": validation.get("samples")}
    for name, m in (validation.get("outputs") or {}).items():
        out[name] = {k: m[k] for k in ("kind", "cosine", "snr_db", "top1", "flip_rate", "prob_mean_abs", "max_abs")
                     if m.get(k) is not None}
    if validation.get("task"):
        out["task"] = {k: validation["task"][k] for k in ("accuracy", "reference_accuracy", "drop_points")}
    return out


# --- the driver ----------------------------------------------------------------------------------------------------

def _job_dir(sweep: Sweep, job: Job) -> Path:
    return sweep.out / "jobs" / f"{job.model}-{job.target}-{job.precision}-{job.key}"


def cached(sweep: Sweep, job: Job) -> bool:
    """The job ran before with the same key: its result is recorded and, if it passed, its bundle verifies."""
    from edgeexport.bundle import loader

    folder = _job_dir(sweep, job)
    result = folder / "result.json"
    if not result.is_file():
        return False
    try:
        data = json.loads(result.read_text())
        status = data["status"].removeprefix("cached-")
        if status not in ("passed", "failed"):  # a job that broke is tried again
            return False
        if status == "passed":
            loader.verify(folder / "bundle")
    except Exception:  # noqa: BLE001 - anything unreadable or damaged is built again
        return False
    if data.get("bench_on") != job.bench_on or (job.bench_on is not None and not data.get("bench")) or \
            (sweep.bench and status == "passed" and not data.get("bench")):
        return False
    job.status = data["status"] if data["status"].startswith("cached-") else f"cached-{data['status']}"
    job.reason, job.metrics = data["reason"], data["metrics"]
    job.bench, job.build_s, job.ran_on = data.get("bench"), data.get("build_s"), data.get("ran_on") or {}
    return True


def _store(sweep: Sweep, job: Job, outcome: dict[str, Any]) -> None:
    """Unpack the returned archive with the loader's checks, verify it, move it into place; record the result."""
    from edgeexport.bundle import loader

    folder = _job_dir(sweep, job)
    folder.mkdir(parents=True, exist_ok=True)
    job.status, job.reason = outcome["status"], outcome.get("reason", "")
    job.metrics, job.build_s = outcome.get("metrics") or {}, outcome.get("build_s")
    job.ran_on["build"] = outcome.get("node")
    if job.status == "passed":
        staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=folder))
        try:
            archive = staging / "bundle.tar.gz"
            archive.write_bytes(outcome["archive"])
            unpacked = staging / "x"
            unpacked.mkdir()
            root = loader.open_archive(archive, unpacked)
            loader.verify(root)
            final = folder / "bundle"
            if final.exists():
                shutil.rmtree(final)
            os.replace(root, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _record(folder, job)


def _record(folder: Path, job: Job) -> None:
    tmp = folder / ".result.json.partial"
    tmp.write_text(json.dumps(job.row(), indent=2, default=str))
    os.replace(tmp, folder / "result.json")


def limit_threads(threads: int) -> None:
    """A worker's thread budget for everything a build runs (PyTorch, onnxruntime, OpenVINO and TensorFlow read
    these at start-up); Ray does the same for its tasks (OMP_NUM_THREADS = the task's CPUs)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


class LocalExecutor:
    """A process pool (spawned processes: each job imports what its target needs, like a fresh `edgeexport build`)."""

    name = "local"

    def __init__(self, workers: Optional[int] = None) -> None:
        import multiprocessing

        from edgeexport.bench import available_cpus

        self.workers = workers or max(1, available_cpus() // 2)
        # each worker gets its share of the CPUs: two builds that each start a thread per core only thrash
        self.threads = max(1, available_cpus() // self.workers)
        self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=limit_threads, initargs=(self.threads,))

    def submit_build(self, job: Job, runtime_env: Optional[dict]) -> Any:
        return self.pool.submit(run_build, job.config)

    def submit_bench(self, job: Job, archive: bytes, settings: dict[str, Any]) -> Any:
        return self.pool.submit(run_bench, archive, settings)

    def wait(self, futures: list[Any]) -> Any:
        return (f for f in as_completed(futures))

    @staticmethod
    def result(future: Any) -> dict[str, Any]:
        return future.result()

    def close(self) -> None:
        self.pool.shutdown()


class RayExecutor:
    """Jobs as Ray tasks on the cluster at ``address``: builds take one CPU anywhere; a bench with ``bench_on``
    takes one unit of that custom resource (and no CPU), so it runs only on nodes that advertise it."""

    name = "ray"

    def __init__(self, address: Optional[str]) -> None:
        try:
            import ray
        except ImportError:
            from edgeexport.errors import MissingExtraError

            raise MissingExtraError("ray", "ray", "--executor ray") from None
        self.ray = ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, ignore_reinit_error=True)
        except Exception as e:  # noqa: BLE001 - e.g. no cluster at that address
            raise ConfigError(f"cannot connect to the Ray cluster at {address or 'auto'}",
                              str(e).splitlines()[0][:300] if str(e) else type(e).__name__,
                              "start one with 'ray start --head' (see docs/sweep.md), or use --executor local") from None
        self.build_task = ray.remote(num_cpus=1, max_retries=0)(run_build)
        self.bench_task = ray.remote(max_retries=0)(run_bench)
        self.resources = ray.cluster_resources()

    def submit_build(self, job: Job, runtime_env: Optional[dict]) -> Any:
        task = self.build_task.options(runtime_env=runtime_env) if runtime_env else self.build_task
        return task.remote(job.config)

    def submit_bench(self, job: Job, archive: bytes, settings: dict[str, Any]) -> Any:
        if job.bench_on and not self.resources.get(job.bench_on):
            raise ConfigError(f"no node of the Ray cluster offers the resource {job.bench_on!r}",
                              f"its resources are {sorted(k for k in self.resources if not k.startswith('node:'))}",
                              f"start a node on the device with: ray start --address=HEAD "
                              f"--resources='{{\"{job.bench_on}\": 1}}'")
        opts: dict[str, Any] = {"num_cpus": 0, "resources": {job.bench_on: 1}} if job.bench_on else {"num_cpus": 1}
        return self.bench_task.options(**opts).remote(archive, settings)

    def wait(self, futures: list[Any]) -> Any:
        pending = list(futures)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            yield done[0]

    def result(self, future: Any) -> dict[str, Any]:
        try:
            return self.ray.get(future)
        except Exception as e:  # noqa: BLE001 - a worker that died is an ERROR row
            return {"status": "error", "reason": f"Ray task failed: {str(e).splitlines()[0][:300]}"}

    def close(self) -> None:
        self.ray.shutdown()


def run(sweep: Sweep, executor: Any, log: Log) -> dict[str, Any]:
    """Every job: cached ones are read back; the rest are built (in parallel), stored as they finish, then benched."""
    started = time.perf_counter()
    sweep.out.mkdir(parents=True, exist_ok=True)
    for job in sweep.jobs:
        job.key = job_key(job)
    todo = [j for j in sweep.jobs if not cached(sweep, j)]
    log(f"==> sweep: {len(sweep.jobs)} jobs ({len(sweep.jobs) - len(todo)} already done), "
        f"executor {executor.name}" + (f" with {executor.workers} workers" if hasattr(executor, "workers") else ""))
    submitted = {executor.submit_build(job, sweep.runtime_env.get(job.target)): job for job in todo}
    benches = {}
    done_n = 0
    for fut in executor.wait(list(submitted)):
        job = submitted[fut]
        outcome = executor.result(fut)
        done_n += 1
        archive = outcome.get("archive")
        _store(sweep, job, outcome)
        log(f"    [{done_n}/{len(todo)}] {job.name}: {job.status.upper()}"
            + (f" ({job.reason[:160]})" if job.reason else "") + (f" in {job.build_s:.1f} s" if job.build_s else ""))
        if job.status == "passed" and (sweep.bench or job.bench_on):
            benches[job.name] = (job, executor.submit_bench(job, archive, sweep.bench))
    for job, fut in benches.values():  # the bench tasks, collected once every build has been stored
        result = executor.result(fut)
        job.bench = result if "error" not in result else None
        job.ran_on["bench"] = result.get("node")
        if "error" in result:
            job.reason = f"bench: {result['error']}"
        _record(_job_dir(sweep, job), job)
        lat = (job.bench or {}).get("latency") or {}
        log(f"    bench {job.name}" + (f" on {job.bench_on}" if job.bench_on else "") +
            (f": p50 {lat['p50_ms']:.3g} ms" if lat else f": {job.reason}"))
    wall = time.perf_counter() - started
    report = {"sweep": sweep.source, "executor": executor.name, "wall_s": wall, "jobs": [j.row() for j in sweep.jobs],
              "built": len(todo), "cached": len(sweep.jobs) - len(todo),
              "command": " ".join(["edgeexport", *sys.argv[1:]]) if sys.argv else "",
              "protocol": {"bench": sweep.bench, "bench_note": "edgeexport bench on each bundle: latency through its "
                           "own loader, warm-up calls first, cold start not measured"}}
    _write_reports(sweep, report)
    return report


def table(report: dict[str, Any]) -> str:
    rows = [["job", "status", "metric", "p50 ms", "ran on", "reason"]]
    for j in report["jobs"]:
        rows.append([j["job"], j["status"].upper(), _headline(j["metrics"]),
                     f"{j['latency_ms_p50']:.3g}" if j["latency_ms_p50"] else "-",
                     (j.get("bench_on") or "") if j.get("bench") else "", (j["reason"] or "")[:70]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _headline(metrics: dict[str, Any]) -> str:
    task = metrics.get("task")
    if task:
        return f"acc {task['accuracy']:.3f}"
    for m in metrics.values():
        if isinstance(m, dict) and m.get("kind"):
            for key in ("top1", "flip_rate", "cosine", "snr_db"):
                if m.get(key) is not None:
                    return f"{key} {m[key]:.4g}"
    return "-"


def _write_reports(sweep: Sweep, report: dict[str, Any]) -> None:
    def atomic(name: str, text: str) -> None:
        tmp = sweep.out / f".{name}.partial"
        tmp.write_text(text)
        os.replace(tmp, sweep.out / name)

    atomic("sweep.json", json.dumps(report, indent=2, default=str))
    atomic("sweep.md", "```\n" + table(report) + "\n```\n")
    atomic("sweep.html", render_html(report))


def _scatter(jobs: list[dict[str, Any]], model: str) -> Optional[str]:
    """Latency against the headline metric for one model's benched jobs (None without matplotlib or points)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from edgeexport.htmlreport import _png
    except ImportError:
        return None
    points: list[tuple[dict[str, Any], str, float]] = []
    for j in jobs:
        headline = _headline_value(j["metrics"]) if j["latency_ms_p50"] else None
        if headline is not None:
            points.append((j, headline[0], headline[1]))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for n, (j, _metric, value) in enumerate(points):
        ax.scatter([j["latency_ms_p50"]], [value], s=55, color=plt.get_cmap("tab10")(n % 10),
                   label=f"{j['target']}/{j['precision']}")
    ax.set_xscale("log")
    ax.set_xlabel("latency p50 (ms, log scale; left is faster)")
    ax.set_ylabel(points[0][1])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.set_title(f"{model}: latency vs {points[0][1]}")
    return _png(fig)


def _headline_value(metrics: dict[str, Any]) -> Optional[tuple[str, float]]:
    text = _headline(metrics)
    if text == "-":
        return None
    name, _, value = text.partition(" ")
    return ("task accuracy" if name == "acc" else name), float(value)


def render_html(report: dict[str, Any]) -> str:
    """The compare report grown to many models: per model, every target x precision with its checked metrics by
    output kind, size, latency, throughput and where it ran, and a latency-vs-accuracy plot (with matplotlib)."""
    import html

    def e(v: Any) -> str:
        return html.escape("-" if v is None or v == "" else str(v))

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    sections = []
    models = list(dict.fromkeys(j["model"] for j in report["jobs"]))
    for model in models:
        jobs = [j for j in report["jobs"] if j["model"] == model]
        rows = []
        for j in jobs:
            bench = j.get("bench") or {}
            outs = "; ".join(f"{name} ({m.get('kind')}): " + ", ".join(
                f"{k} {v:.4g}" for k, v in m.items() if k != "kind" and isinstance(v, (int, float)))
                for name, m in (j["metrics"] or {}).items() if isinstance(m, dict) and "kind" in m)
            task = (j["metrics"] or {}).get("task")
            if task:
                outs += f"; task accuracy {task['accuracy']:.4f} (reference {task['reference_accuracy']:.4f})"
            status = j["status"].split("-")[-1]
            rows.append(
                f"<tr><td>{e(j['target'])}/{e(j['precision'])}</td><td class='{status}'>{e(j['status'].upper())}</td>"
                f"<td>{e(outs)}</td><td>{num(bench.get('model_file_bytes') and bench['model_file_bytes'] / 1024, '.1f')}"
                f"</td><td>{num(j['latency_ms_p50'], '.4g')}</td><td>{num(bench.get('throughput_per_s'), '.4g')}</td>"
                f"<td>{num(bench.get('gflops_per_s'), '.3g')}</td><td>{e(j.get('bench_on'))}</td>"
                f"<td>{num(j['build_s'], '.1f')}</td><td>{e(j['reason'])}</td></tr>")
        plot = _scatter(jobs, model)
        figure = (f"<figure><img alt='latency vs accuracy for {e(model)}' src='data:image/png;base64,{plot}'>"
                  "</figure>" if plot else "")
        sections.append(
            f"<h2>{e(model)}</h2><table><tr><th>target/precision</th><th>status</th><th>checked metrics by output "
            "(kind)</th><th>model KiB</th><th>p50 ms</th><th>per s</th><th>GFLOP/s</th><th>bench on</th>"
            f"<th>build s</th><th>reason</th></tr>{''.join(rows)}</table>{figure}")
    protocol = html.escape(json.dumps(report["protocol"]))
    return ("<!doctype html><meta charset='utf-8'><title>edgeexport sweep</title><style>"
            "body{font-family:sans-serif;max-width:1200px}td,th{padding:2px 8px;border-bottom:1px solid #ddd;"
            "text-align:left;vertical-align:top}.passed{color:#070}.failed,.error{color:#a00}</style>"
            f"<h1>edgeexport sweep</h1><p>{e(report['sweep'])}: {len(report['jobs'])} jobs on the {e(report['executor'])}"
            f" executor, {report['built']} built, {report['cached']} reused, {report['wall_s']:.1f} s.</p>"
            f"<p>Command: <code>{e(report['command'])}</code></p><p>Protocol: <code>{protocol}</code></p>"
            + "".join(sections))


__all__ = ["load_sweep", "run", "table", "LocalExecutor", "RayExecutor", "run_build", "run_bench"]
