"""`edgeexport compare`: build every target x precision, validate each, and time each next to PyTorch eager.

The model is loaded, its data split and its ONNX exported once; every combination is then built from that export
and validated on the same held-out samples. Timing comes last, in interleaved rounds (eager, then each bundle through
its own loader, round after round) so that machine drift hits every variant alike. A combination that cannot be
built here, fails validation or breaks is a row that says why, never a crash of the whole comparison.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from functools import partial
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from edgeexport.config import BuildConfig
from edgeexport.errors import EdgeExportError, UsageError, ValidationFailed
from edgeexport.util import tmp_prefix

Log = Callable[[str], None]

#: the same technique under each target's honest name: int8 weights, float activations


@dataclass
class Settings:
    warmup: int = 10
    runs: int = 100
    rounds: int = 3
    threads: Optional[int] = None
    #: time combinations that fail validation too (built again with every limit lifted; that bundle is not kept)
    time_failed: bool = False


#: limits that let anything pass, for timing a refused combination (never for a bundle that is kept)
_LIFTED = {"cosine": -1.0, "snr_db": -1e9, "top1": 0.0, "pooled_cosine": -1.0, "top5": 0.0,
           "accuracy_drop": 1e9, "max_abs": 1e30, "prob_mean_abs": 1.0, "flip_rate": 1.0, "next_token_top1": 0.0,
           "kl_divergence": 100.0, "perplexity_change": 100.0}


@dataclass
class Row:
    target: str
    precision: str
    status: str = "pending"  # passed | failed (validation) | error | skipped
    reason: str = ""
    out: Optional[Path] = None
    size_bytes: Optional[int] = None
    deflated_bytes: Optional[int] = None  # the model file after zlib: what an archive or a download of it costs
    latency: Optional[dict[str, Any]] = None
    speedup: Optional[float] = None
    speedup_noise: Optional[str] = None  # why the timing spread does not support the speed-up (None: it does)
    speedup_range: Optional[list[float]] = None  # the per-round speed-ups' range where they disagree
    gflops_per_s: Optional[float] = None
    metrics: dict[str, Any] = field(default_factory=dict)
    validation: Optional[dict[str, Any]] = None
    build_s: Optional[float] = None
    #: decoders: time to first token, prefill and decode tokens/s (latency is then per decoded token)
    generation: Optional[dict[str, Any]] = None
    errors: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def add_note(self, text: str) -> None:
        self.reason = f"{self.reason}; {text}" if self.reason else text

    def broke(self, e: Exception) -> None:
        """A build that raised: an ERROR row with the error's own words (one broken combination is a row, not the
        end of the comparison)."""
        self.status = "error"
        if isinstance(e, EdgeExportError):
            self.add_note(f"{e.what}" + (f": {e.why}" if e.why else ""))
        else:
            self.add_note(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}")

    def measure_size(self, out: Optional[Path], manifest: dict[str, Any]) -> None:
        """The model file(s) of a built bundle: bytes on disk and after zlib."""
        from edgeexport.pipeline import deflated_size

        if out is None:  # a build that wrote nothing (--dry-run) has no size
            return
        paths = [out / name for name in manifest.get("model_files") or [manifest["model_file"]]]
        self.size_bytes = sum(p.stat().st_size for p in paths)
        self.deflated_bytes = sum(deflated_size(p) for p in paths)

    @property
    def key(self) -> str:
        return f"{self.target}/{self.precision}"

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "precision": self.precision, "status": self.status, "reason": self.reason,
                "bundle": str(self.out) if self.out else None, "size_bytes": self.size_bytes,
                "deflated_bytes": self.deflated_bytes,
                "latency": self.latency, "speedup_vs_reference": self.speedup,
                "speedup_supported": self.speedup is not None and self.speedup_noise is None,
                "speedup_noise": self.speedup_noise, "speedup_range": self.speedup_range,
                "gflops_per_s": self.gflops_per_s,
                "metrics": self.metrics, "validation": self.validation, "build_s": self.build_s,
                "generation": self.generation}


@dataclass
class Comparison:
    model: str
    rows: list[Row]
    reference: dict[str, Any]
    data: dict[str, Any]
    protocol: dict[str, Any]
    accuracy_metric: str
    model_stats: Optional[dict[str, Any]] = None
    command: str = ""
    pruning: Optional[dict[str, Any]] = None  # what --prune did before the one export every row was built from
    chosen: Optional[Row] = None  # the recommendation
    focus: Optional[Row] = None  # the row whose error histograms the report shows (default: the recommendation)
    #: "model" (one forward per sample) or "decoder" (--task text-generation: timed per token, generation metrics)
    kind: str = "model"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "kind": self.kind, "reference": self.reference, "data": self.data, "protocol": self.protocol,
                "accuracy_metric": self.accuracy_metric, "model_stats": self.model_stats, "command": self.command,
                "pruning": self.pruning,
                "recommended": self.chosen.key if self.chosen else None,
                "focus": self.focus.key if self.focus else None, "rows": [r.to_dict() for r in self.rows]}

    def table(self) -> str:
        return "\n".join(table_lines(self))


def plan(targets: list[str], precisions: Optional[list[str]]) -> list[Row]:
    """One row per combination; ones that cannot be built here are already marked skipped, with the reason."""
    from edgeexport.targets import all_targets, get_target

    rows = []
    for name in targets:
        target = get_target(name)
        weight_only = {t.weight_only for t in all_targets() if t.weight_only}
        for asked in precisions or list(target.precisions):
            precision = target.weight_only if asked in weight_only and target.weight_only else asked
            row = Row(name, precision)
            if precision != asked:
                row.add_note(f"asked for {asked}: {name} calls int8 weights with float activations {precision}")
            if precision not in target.precisions:
                row.status = "skipped"
                row.add_note(f"{name} has no {asked} precision (it has {', '.join(target.precisions)})")
            elif missing := [m for m in target.build_imports if importlib.util.find_spec(m) is None]:
                row.status = "skipped"
                row.add_note(f"needs {', '.join(missing)}: pip install 'edgeexport[{target.extra}]'")
            rows.append(row)
    return rows


def _problems(target: Any, config: BuildConfig) -> str:
    problems = target.check(config) + target.check_inputs(config.inputs, config.calibration.max_length)
    return "; ".join(f"{p.field}: {p.message}" + (f" ({p.fix})" if p.fix else "") for p in problems)


def _primary_metrics(validation: dict[str, Any]) -> dict[str, Any]:
    name, m = next(iter(validation["outputs"].items()))
    cos = m.get("pooled_cosine", m.get("cosine_unpadded", m.get("cosine")))
    out = {"output": name, "kind": m.get("kind"), "cosine": cos, "top1": m.get("top1"), "snr_db": m.get("snr_db"),
           "flip_rate": m.get("flip_rate"), "samples": m.get("samples", validation.get("samples"))}
    task = validation.get("task")
    if task:
        out.update(task_accuracy=task["accuracy"], reference_accuracy=task["reference_accuracy"],
                   task_drop_points=task["drop_points"])
    return out


def _row_config(row: Row, base: BuildConfig, out_root: Path) -> BuildConfig:
    """The build of one row; marks the row skipped when its target refuses the settings or the inputs."""
    from edgeexport.targets import get_target

    target = get_target(row.target)
    opts = {k: v for k, v in base.target_options.items() if k in target.options_spec}
    config = base.model_copy(update={"target": row.target, "precision": row.precision, "target_options": opts,
                                     "out": str(out_root / f"{row.target}-{row.precision}"), "force": True,
                                     "bench": base.bench.model_copy(update={"enabled": False}),
                                     "diagnose": False})  # a survey: a refused row is reported, not diagnosed
    problems = _problems(target, config)
    if problems:
        row.status = "skipped"
        row.add_note(problems)
    return config


def _build_row(row: Row, config: BuildConfig, resolved: tuple, log: Log, time_failed_in: Optional[Path] = None
               ) -> None:
    from edgeexport import pipeline

    source, calib, exported = resolved
    t0 = time.perf_counter()
    try:
        result = pipeline.build_resolved(config, source, calib, log, exported)
    except ValidationFailed as e:
        row.status = "failed"
        row.add_note(f"validation: {e.why}")
        row.validation = e.report.to_dict() if e.report is not None else None
        row.errors = e.errors
        if time_failed_in is not None:
            _rebuild_lifted(row, config, resolved, time_failed_in, log)
    except Exception as e:  # noqa: BLE001 - one broken combination is a row, not the end of the comparison
        row.broke(e)
    else:
        row.status, row.out, row.errors = "passed", result.out, result.errors
        row.validation = result.report.to_dict() if result.report is not None else None
        runtime = result.manifest["validation"].get("runtime", "")
        if runtime != f"{row.target} runtime":
            row.add_note(f"validated with {runtime}")
        row.measure_size(result.out, result.manifest)
    row.build_s = time.perf_counter() - t0
    if row.validation:
        row.metrics = _primary_metrics(row.validation)


def _rebuild_lifted(row: Row, config: BuildConfig, resolved: tuple, where: Path, log: Log) -> None:
    """Build a refused combination again with every limit lifted, only so that it can be timed; never kept."""
    from edgeexport import pipeline

    source, calib, exported = resolved
    lifted = config.model_copy(update={"tolerance": {k: _LIFTED[k] for k in config.resolved_tolerance()},
                                       "out": str(where / f"{row.target}-{row.precision}")})
    try:
        result = pipeline.build_resolved(lifted, source, calib, log, exported)
    except Exception as e:  # noqa: BLE001 - reported in the row
        row.add_note(f"could not time it: {type(e).__name__}: {e}")
        return
    row.measure_size(result.out, result.manifest)
    skip = (result.manifest.get("benchmark") or {}).get("skipped")
    if skip:
        row.add_note(f"latency not measured: {skip}")
        return
    row.out, row.errors = result.out, result.errors
    row.add_note("timed anyway: built again with the limits lifted (that bundle was not kept)")


def _reference_size(source: Any) -> Optional[int]:
    return source.reference_bytes()


def _time_all(rows: list[Row], ref_runner: Any, feed: dict[str, np.ndarray], settings: Settings, log: Log
              ) -> dict[str, float]:
    """Interleaved rounds: eager, then every passed bundle through its own loader, all with the same thread count.
    Returns the eager summary."""
    from edgeexport.bench import interleaved, resolve_threads, set_torch_threads, speedup
    from edgeexport.bundle import loader

    set_torch_threads(resolve_threads(settings.threads))
    runners: dict[str, Callable[[], Any]] = {"reference": lambda: ref_runner._infer_impl(feed)}
    ref_runner.infer(feed)
    for row in rows:
        if row.out is None:
            continue
        skip = (loader.read_manifest(row.out).get("benchmark") or {}).get("skipped")
        if skip:
            row.add_note(f"latency not measured: {skip}")
            continue
        try:
            model = loader.load(row.out, threads=settings.threads,
                                **loader.timing_options(loader.read_manifest(row.out)))
            model(feed)  # checks the feed once; timed calls go straight to the runtime
        except Exception as e:  # noqa: BLE001 - reported in the row; the others are still timed
            row.add_note(f"latency not measured: its loader failed: {type(e).__name__}: {e}")
            continue
        runners[row.key] = partial(_run_backend, model, feed)
    timed = interleaved(runners, settings.warmup, settings.runs, settings.rounds, log)
    for row in rows:
        if row.key in timed:
            row.latency = timed[row.key]
            # the speed-up in each round (eager and this variant timed minutes apart at most): its range, and each
            # side's own spread, say whether the ratio holds
            ratio = speedup(timed["reference"], row.latency)
            row.latency["speedup_by_round"] = ratio["speedup_by_round"]
            row.speedup, row.speedup_noise, row.speedup_range = ratio["speedup"], ratio["noise"], ratio["range"]
            if ratio["noise"]:
                row.add_note(f"speed-up not supported by the spread ({ratio['noise']}): the machine was busy; "
                             "rerun on an idle machine")
    return timed["reference"]


def _run_backend(model: Any, feed: dict[str, np.ndarray]) -> Any:
    return model._backend.run(feed)


def accuracy_metric(rows: list[Row]) -> str:
    ms = [r.metrics for r in rows if r.metrics]
    if any(m.get("task_accuracy") is not None for m in ms):
        return "task_accuracy"
    if any(m.get("top1") is not None for m in ms):
        return "top1"
    return "cosine"


#: latencies within this fraction of the fastest count as a tie (run-to-run noise); the smaller file wins a tie
TIE = 0.05


def choose(rows: list[Row]) -> Optional[Row]:
    """The fastest combination that passed validation, the smallest file among near-ties; else the first passed."""
    passed = [r for r in rows if r.status == "passed"]
    timed = [(r, r.latency["p50_ms"]) for r in passed if r.latency]
    if timed:
        fastest = min(p50 for _, p50 in timed)
        near = [(r, p50) for r, p50 in timed if p50 <= fastest * (1 + TIE)]
        return min(near, key=lambda rp: (rp[0].size_bytes or 0, rp[1]))[0]
    return passed[0] if passed else None


def run(base: BuildConfig, targets: list[str], precisions: Optional[list[str]], settings: Settings,
        out_root: Optional[Path] = None, log: Log = print, command: str = "", focus: Optional[str] = None
        ) -> Comparison:
    """Build, validate and time every combination. ``out_root`` keeps the bundles (else they go to a temp folder);
    ``focus`` ('target/precision') picks the row whose errors the report plots. A decoder (--task
    text-generation) is compared by compare_decoder.run, which builds on this module."""
    from edgeexport import pipeline
    from edgeexport.bench import machine, resolve_threads, runtime_versions
    from edgeexport.targets import DEFAULT_TARGET, known_precisions

    unknown_p = [p for p in precisions or [] if p not in known_precisions()]
    if unknown_p:
        raise UsageError(f"--precisions names {', '.join(unknown_p)}, which no target has",
                         f"the precisions are {', '.join(known_precisions())}", "pass some of those")
    if not targets:
        raise UsageError("--targets is empty", "", f"e.g. --targets {DEFAULT_TARGET}")
    settings = dataclasses.replace(settings, threads=resolve_threads(settings.threads))
    rows = plan(targets, precisions)
    if focus is not None and focus not in [r.key for r in rows]:
        raise UsageError(f"--focus {focus!r} is not one of the compared combinations",
                         f"they are {', '.join(r.key for r in rows)}", "pass one of them, as TARGET/PRECISION")
    unknown = set(base.target_options) - {k for r in rows for k in _options_of(r.target)}
    if unknown:
        raise UsageError(f"--option {', '.join(sorted(unknown))}: no compared target knows it",
                         "", "see each target's options in the README")
    with tempfile.TemporaryDirectory(prefix=tmp_prefix("compare-")) as tmp:
        root = out_root or Path(tmp) / "bundles"
        # resolves the model, inputs and data once for every row through the core target (no extra, any shapes);
        # each row's own target checks come with its row
        probe = base.model_copy(update={"target": DEFAULT_TARGET, "precision": "fp32", "target_options": {},
                                        "out": str(Path(tmp) / "probe"), "force": False})
        quiet = _step_log(log, "      ")
        config, source, calib = pipeline.resolve(probe, quiet)
        exported = pipeline.export(config, source, calib, Path(tmp) / "exported.onnx", quiet)
        config = config.model_copy(update={"target_options": base.target_options})
        configs = {r.key: _row_config(r, config, root) for r in rows if r.status == "pending"}
        todo = [r for r in rows if r.status == "pending"]
        for i, row in enumerate(todo, 1):
            log(f"[{i}/{len(todo)}] {row.key}: building and validating")
            _build_row(row, configs[row.key], (source, calib, exported), quiet,
                       Path(tmp) / "refused" if settings.time_failed else None)
            log(f"[{i}/{len(todo)}] {row.key}: {row.status}" + (f" ({row.reason})" if row.reason else "")
                + (f" in {row.build_s:.1f} s" if row.build_s is not None else ""))
        feed = next(calib.holdout())
        with source.reference(config.inputs, exported.output_names) as ref:
            ref_latency = _time_all(rows, ref, feed, settings, log)
        flops = (exported.stats or {}).get("flops_per_sample")
        for row in rows:
            if row.latency:
                row.gflops_per_s = flops / (row.latency["p50_ms"] * 1e6) if flops else None
        for row in rows:
            if out_root is None or row.status != "passed":
                row.out = None  # only bundles that passed and were asked to be kept are reported
    reference = {"kind": "PyTorch eager fp32" if source.kind != "onnx" else "onnxruntime (the source is ONNX)",
                 "latency": ref_latency, "size_bytes": _reference_size(source),
                 "gflops_per_s": flops / (ref_latency["p50_ms"] * 1e6) if flops else None}
    protocol = {"warmup": settings.warmup, "runs_per_round": settings.runs, "rounds": settings.rounds,
                "threads": settings.threads,
                "threads_note": "PyTorch and every runtime ran with this many threads (--threads; default: the CPUs "
                                "this process may use)", "batch": 1, "feed_shapes": {k: list(v.shape) for k, v in feed.items()},
                "timed": "runtime call through each bundle's loader (inputs checked once before), interleaved rounds",
                "machine": machine(), "versions": runtime_versions(),
                "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result = Comparison(base.model, rows, reference, calib.summary(), protocol, accuracy_metric(rows),
                        exported.stats, command, pruning=exported.pruning)
    result.chosen = choose(rows)
    result.focus = next((r for r in rows if r.key == focus), None) or result.chosen
    return result


def _options_of(target: str) -> list[str]:
    from edgeexport.targets import get_target

    return list(get_target(target).options_spec)


def _step_log(log: Log, indent: str) -> Log:
    """Pass on the pipeline's step lines (==> and notes), not its validation tables (the comparison has its own)."""
    def step(msg: str) -> None:
        first = msg.splitlines()[0] if msg else ""
        if first.startswith(("==>", "    note:", "WARNING", "    model:", "    data:", "    inputs:")):
            log(indent + first.strip())
    return step


def _f(v: Optional[float], fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:+.2f}%"


def table_rows(c: Comparison) -> tuple[list[str], list[list[str]]]:
    """The comparison's header and rows as text cells (the reference first): the text table's and the report's."""
    ref = c.reference
    status = lambda r: r.status.upper() if r.status != "passed" else r.status  # noqa: E731
    if c.kind == "decoder":
        head = ["target", "precision", "status", "size KiB", "TTFT ms", "decode tok/s", "decode speed-up",
                "ppl change", "top-1 (decisive)", "KL"]
        g = ref["generation"]
        body = [["reference", ref["kind"], "-", _f(ref["size_bytes"] and ref["size_bytes"] / 1024, ",.1f"),
                 _f(g["ttft_ms"], ".2f"), _f(g["decode_tokens_per_s"], ",.0f"), "1.00x", "-", "-", "-"]]
        for r in c.rows:
            m, gen = r.metrics, r.generation or {}
            body.append([r.target, r.precision, status(r), _f(r.size_bytes and r.size_bytes / 1024, ",.1f"),
                         _f(gen.get("ttft_ms"), ".2f"), _f(gen.get("decode_tokens_per_s"), ",.0f"), speedup_cell(r),
                         _pct(m.get("perplexity_change")),
                         _f(m.get("next_token_top1"), ".4f"), _f(m.get("kl_divergence"), ".2g")])
        return head, body
    head = ["target", "precision", "status", "size KiB", "p50 ms", "p90 ms", "speed-up", "cosine", "top-1",
            "task drop", "GFLOP/s"]
    body = [["reference", ref["kind"], "-", _f(ref["size_bytes"] and ref["size_bytes"] / 1024, ".1f"),
             _f(ref["latency"]["p50_ms"], ".4g"), _f(ref["latency"]["p90_ms"], ".4g"), "1.00x", "-", "-", "-",
             _f(ref.get("gflops_per_s"), ".3g")]]
    for r in c.rows:
        m, lat = r.metrics, r.latency or {}
        body.append([r.target, r.precision, status(r),
                     _f(r.size_bytes and r.size_bytes / 1024, ".1f"), _f(lat.get("p50_ms"), ".4g"),
                     _f(lat.get("p90_ms"), ".4g"), speedup_cell(r),
                     _f(m.get("cosine"), ".5f"), _f(m.get("top1"), ".3f"), _f(m.get("task_drop_points"), "+.2f"),
                     _f(r.gflops_per_s, ".3g")])
    return head, body


def table_lines(c: Comparison, markdown: bool = False) -> list[str]:
    head, body = table_rows(c)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
    else:
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in body]
    notes = [f"{r.key}: {r.reason}" for r in c.rows if r.reason]
    if c.pruning:
        notes.insert(0, f"every row is pruned ({c.pruning['summary']}) and validated against the unpruned model, "
                        "which is also the reference timed here")
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    lines += ["", recommendation(c)]
    return lines


def speedup_cell(r: Row) -> str:
    if r.speedup is None:
        return "-"
    from edgeexport.bench import format_speedup

    return format_speedup({"speedup": r.speedup, "supported": r.speedup_noise is None, "range": r.speedup_range})


def recommendation(c: Comparison) -> str:
    r = c.chosen
    if r is None:
        return "No combination passed validation: nothing to recommend."
    if not r.latency:
        return f"Passed validation: {r.key} (no latency measured here, so no speed ranking)."
    size = f", {r.size_bytes / c.reference['size_bytes']:.2f}x the size" if c.reference["size_bytes"] else ""
    fastest = "decodes fastest" if c.kind == "decoder" else "is the fastest"
    return (f"Recommended: {r.key}: it passed validation and {fastest}, or is the smallest within {TIE:.0%} of "
            f"the fastest ({r.speedup:.2f}x vs {c.reference['kind']}{size}).")
