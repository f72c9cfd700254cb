"""Accuracy budget: quantize, and while the budget is not met, keep the layers that add the most error in float.

Each round builds the int8 model with the current float exclusions, validates it on the held-out samples (the same
comparison as the gate), and, if the budget metric is still short, ranks the layers on calibration samples (never
the held-out ones) by the error they add (:mod:`edgeexport.sensitivity`) and moves the next worst ones to float:
one layer, then two, four, ... (each with its consumers, so that its output is no longer quantized). It stops when
the budget holds, when nothing is left to move, when more than ``MAX_FLOAT_SHARE`` of the layers would be float,
or after ``config.budget_steps`` rounds; then it fails with the best value it reached.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from edgeexport.config import BUDGET_METRICS, BuildConfig
from edgeexport.errors import ValidationFailed
from edgeexport.bench import resolve_threads
from edgeexport.util import tmp_prefix

MAX_FLOAT_SHARE = 0.5  # of the weighted layers (Conv, Gemm, MatMul): beyond that, int8 has lost its point
RANK_SAMPLES = 32
Log = Callable[[str], None]


def budget_value(report: Any, metric: str) -> Optional[float]:
    """The worst value of ``metric`` over the outputs the gate checked (None when the gate had no such check)."""
    values = [c.value for c in report.checks if c.metric == metric]
    if not values:
        return None
    return min(values) if BUDGET_METRICS[metric] == "min" else max(values)


def met(value: Optional[float], metric: str, limit: float) -> bool:
    if value is None:
        return False
    return value >= limit if BUDGET_METRICS[metric] == "min" else value <= limit


def _better(a: float, b: float, metric: str) -> bool:
    return a > b if BUDGET_METRICS[metric] == "min" else a < b


def validate(config: BuildConfig, source: Any, calib: Any, artifact: Any, target: Any, output_names: list[str]):
    from edgeexport.validate import holdout_report

    with source.reference(config.inputs, output_names) as ref, target.load(artifact, resolve_threads(config.bench.threads)) as cand:
        return holdout_report(ref, cand, config, calib)[0]


def _weighted_nodes(float_model: Path) -> set[str]:
    import onnx

    from edgeexport.sensitivity import WEIGHTED

    return {n.name for n in onnx.load(str(float_model)).graph.node if n.op_type in WEIGHTED}


def trial_config(config: BuildConfig, target: Any, excluded: list[str], wide: list[str]) -> BuildConfig:
    """``config`` with these nodes in float and these tensors in 16 bits, and no engine built (trials validate the
    ONNX)."""
    options = {**config.target_options, "exclude_nodes": list(excluded)}
    if wide or "int16_tensors" in options:
        options["int16_tensors"] = list(wide)
    options.update(target.trial_overrides(config))  # e.g. no engine build: trials only validate
    return config.model_copy(update={"target_options": options})


@contextlib.contextmanager
def scratch_build(target: Any, source: Any, config: BuildConfig, calib: Any, onnx_path: Path, prefix: str
                  ) -> Iterator[Any]:
    """The artifact ``target`` builds for ``config`` from a copy of ``onnx_path`` (targets may rewrite their
    input), in a temporary folder removed on exit."""
    with tempfile.TemporaryDirectory(prefix=tmp_prefix(prefix)) as tmp:
        work = Path(tmp)
        shutil.copyfile(onnx_path, work / "exported.onnx")
        yield target.build(source, config, calib, work, work / "exported.onnx")


def search(config: BuildConfig, source: Any, calib: Any, onnx_path: Path, output_names: list[str], log: Log
           ) -> tuple[BuildConfig, dict[str, Any]]:
    """Find the mix of int8, int16 and float that meets ``config.accuracy_budget``. Returns the config to build
    and the record. Each round moves the worst layers one step up: int8 -> int16 activations (where the target
    runs them) -> float. Once the budget holds, layers are tried back at their lower precision, last moved first,
    and kept there when the budget still holds."""
    from edgeexport.recipes import take
    from edgeexport.sensitivity import label, rank_layers
    from edgeexport.targets import get_target

    (metric, limit), = config.accuracy_budget.items()
    target = get_target(config.target)
    int16 = "int16_tensors" in target.options_spec
    excluded = list(config.target_options.get("exclude_nodes") or [])
    wide = list(config.target_options.get("int16_tensors") or [])
    steps: list[dict[str, Any]] = []
    moves: list[tuple[str, Any]] = []  # ("int16", tensor) or ("float", [nodes]) in the order they were made
    last_round = 0
    best: Optional[dict[str, Any]] = None
    feeds = take(calib.calibration(), RANK_SAMPLES)
    weighted: set[str] = set()
    relation = ">=" if BUDGET_METRICS[metric] == "min" else "<="
    log(f"==> accuracy budget: {metric} {relation} {limit:g} on {len(calib.holdout_idx)} held-out samples"
        + ("" if int16 else f" (target {config.target!r} has no 16-bit activations: layers go from int8 to float)"))

    def evaluate(excl: list[str], w: list[str], keep: bool):
        trial = trial_config(config, target, excl, w)
        with scratch_build(target, source, trial, calib, onnx_path, "budget-") as artifact:
            value = budget_value(validate(trial, source, calib, artifact, target, output_names), metric)
            ranked = (rank_layers(artifact.float_model, artifact.model_path, feeds)
                      if keep and artifact.float_model is not None else None)
            if keep and artifact.float_model is not None and not weighted:
                weighted.update(_weighted_nodes(artifact.float_model))
        return value, ranked

    for step in range(config.budget_steps + 1):
        value, ranked = evaluate(excluded, wide, keep=True)
        record = {"step": step, "float_nodes": list(excluded), "int16_tensors": list(wide), "value": value,
                  "met": met(value, metric, limit)}
        steps.append(record)
        log(f"    step {step}: {len(wide)} tensor(s) in int16, {len(excluded)} node(s) in float -> {metric} = "
            f"{'n/a' if value is None else f'{value:.5g}'} ({'met' if record['met'] else 'short'})")
        if value is not None and (best is None or _better(value, best["value"], metric)):
            best = record
        if record["met"] or ranked is None:
            break
        record["worst"] = [{k: r[k] for k in ("node", "module", "op_type", "nodes", "output", "local_noise_db",
                                              "added_noise_db", "snr_db")} for r in ranked[:5]]
        if step == 0 and ranked:
            log("    worst layers (own quantization noise): "
                + ", ".join(f"{label(r)} ({r['local_noise_db']:.1f} dB)" for r in ranked[:3]))
        fresh = [r for r in ranked
                 if (r["local_noise"] > 0 or r["added_noise"] > 0) and not set(r["nodes"]) <= set(excluded)]
        new_wide, new_float = [], []
        for r in fresh[: 2 ** step]:
            if int16 and r["quantized_output"] and r["output"] not in wide:
                new_wide.append(r["output"])
            else:
                new_float.append([n for n in r["float_fallback"] if n not in excluded])
        share = len(weighted & (set(excluded) | {n for g in new_float for n in g})) / max(1, len(weighted))
        if not (new_wide or any(new_float)) or share > MAX_FLOAT_SHARE:
            log("    stopping: " + ("no layer left to move" if not (new_wide or any(new_float)) else
                                     f"more than {MAX_FLOAT_SHARE:.0%} of the layers would be float"))
            break
        wide += new_wide
        last_round = len(moves)  # where this round's moves start
        moves += [("int16", t) for t in new_wide]
        for group in new_float:
            if group:
                excluded += [n for n in group if n not in excluded]
                moves.append(("float", group))
    if steps[-1]["met"]:
        base_excl = list(config.target_options.get("exclude_nodes") or [])
        base_wide = list(config.target_options.get("int16_tensors") or [])
        moves, tries, kept = _trim_last_round(steps, moves, last_round, base_excl, base_wide, evaluate, metric,
                                              limit, config.budget_steps, log)
        excluded, wide = _apply(base_excl, base_wide, moves)
        excluded, wide = _give_back(steps, moves, excluded, wide, kept, evaluate, metric, limit, tries, log)
    result = {"metric": metric, "limit": limit, "relation": relation, "steps": steps,
              "float_nodes": excluded if steps[-1]["met"] else None,
              "int16_tensors": wide if steps[-1]["met"] else None,
              "met": steps[-1]["met"], "ranked_on": f"{len(feeds)} calibration samples",
              "int16": "yes" if int16 else f"target {config.target!r} has no 16-bit activations"}
    if not steps[-1]["met"]:
        reached = "n/a" if best is None else f"{best['value']:.5g}"
        err = ValidationFailed(
            f"accuracy budget not met: {metric} {relation} {limit:g} was not reached; no bundle was written",
            f"best reachable {metric} = {reached} with "
            f"{0 if best is None else len(best['int16_tensors'])} tensor(s) in int16 and "
            f"{0 if best is None else len(best['float_nodes'])} node(s) in float, after {len(steps)} round(s)",
            "relax the budget, try another --calib-method, raise --budget-steps, or use a higher precision",
            budget=result)
        raise err
    options = {**config.target_options, "exclude_nodes": excluded}
    if int16:
        options["int16_tensors"] = wide
    return config.model_copy(update={"target_options": options}), result


def _apply(excluded: list[str], wide: list[str], moves: list[tuple[str, Any]]) -> tuple[list[str], list[str]]:
    """The float nodes and int16 tensors after ``moves``, on top of the user's own."""
    excl, w = list(excluded), list(wide)
    for kind, what in moves:
        if kind == "int16":
            w.append(what)
        else:
            excl += [n for n in what if n not in excl]
    return excl, w


def _trim_last_round(steps: list, moves: list, start: int, excluded: list[str], wide: list[str], evaluate: Callable,
                     metric: str, limit: float, tries: int, log: Log) -> tuple[list, int, Optional[float]]:
    """The last round moved 2^k layers at once, usually more than the budget needed. Bisect it for the fewest of
    them, in ranking order, that still meet the budget (about k rebuilds instead of one per move). Returns the
    moves kept, the rebuilds left for the one-by-one give-back, and the budget value of the moves kept."""
    lo, hi = start, len(moves)  # moves[:lo] fell short (the previous round), moves[:hi] meet the budget
    kept = steps[-1]["value"]
    while hi - lo > 1 and tries > 0:
        mid = (lo + hi) // 2
        excl, w = _apply(excluded, wide, moves[:mid])
        value, _ = evaluate(excl, w, keep=False)
        tries -= 1
        ok = met(value, metric, limit)
        log(f"    give back the last {len(moves) - mid} of this round's {len(moves) - start} move(s) -> {metric} = "
            f"{'n/a' if value is None else f'{value:.5g}'} ({'kept lower' if ok else 'reverted'})")
        steps.append({"step": len(steps), "give_back": {"last_moves": len(moves) - mid}, "float_nodes": excl,
                      "int16_tensors": w, "value": value, "met": ok})
        if ok:
            hi, kept = mid, value
        else:
            lo = mid
    return moves[:hi], tries, kept


def _give_back(steps: list, moves: list, excluded: list[str], wide: list[str], kept: Optional[float],
               evaluate: Callable, metric: str, limit: float, tries: int, log: Log) -> tuple[list[str], list[str]]:
    """With the budget met by ``excluded`` and ``wide`` (value ``kept``), try each move back at its lower precision
    (float -> int16/int8, int16 -> int8), the last made first; keep the ones the budget survives. At most ``tries``
    rebuilds."""
    seen = {(tuple(sorted(s["float_nodes"])), tuple(sorted(s["int16_tensors"]))): s["value"] for s in steps}
    for kind, what in reversed(moves):
        if tries <= 0:
            break
        if kind == "int16":
            trial_excl, trial_wide = excluded, [t for t in wide if t != what]
        else:
            trial_excl, trial_wide = [n for n in excluded if n not in what], wide
        key = (tuple(sorted(trial_excl)), tuple(sorted(trial_wide)))
        if key in seen and not met(seen[key], metric, limit):
            continue  # already measured short (e.g. plain int8)
        value, _ = evaluate(trial_excl, trial_wide, keep=False)
        tries -= 1
        seen[key] = value
        ok = met(value, metric, limit)
        name = what if kind == "int16" else ", ".join(what[:2]) + (" ..." if len(what) > 2 else "")
        log(f"    give back {'int16' if kind == 'int16' else 'float'} {name} -> {metric} = "
            f"{'n/a' if value is None else f'{value:.5g}'} ({'kept lower' if ok else 'reverted'})")
        steps.append({"step": len(steps), "give_back": {kind: what}, "float_nodes": list(trial_excl),
                      "int16_tensors": list(trial_wide), "value": value, "met": ok})
        if ok:
            excluded, wide, kept = list(trial_excl), list(trial_wide), value
    if steps[-1]["met"] is False:  # the final record must describe what is built
        steps.append({"step": len(steps), "float_nodes": list(excluded), "int16_tensors": list(wide),
                      "value": kept, "met": True, "final": True})
    return excluded, wide


@contextlib.contextmanager
def _timing_runner(target: Any, artifact: Any, config: BuildConfig, validating: Any) -> Iterator[Any]:
    """What the build's benchmark times for ``artifact`` (the device's kernels, see Target.load_for_timing), else
    ``validating`` (or a new validating Runner when None)."""
    threads = resolve_threads(config.bench.threads)
    timer = target.load_for_timing(artifact, threads)
    if timer is None and validating is not None:
        yield validating
        return
    with timer or target.load(artifact, threads) as runner:
        yield runner


def compare_mix(config: BuildConfig, source: Any, calib: Any, onnx_path: Path, target: Any, cand: Any,
                artifact: Any, budget: dict[str, Any], log: Log) -> dict[str, Any]:
    """Size and latency of the mix the budget chose next to plain int8 and fp32, built from the same ONNX by the
    same target and timed with the same protocol and threads, one after the other on the same feed."""
    from edgeexport.bench import bench_runner

    feed = next(calib.holdout())
    protocol = dict(warmup=config.bench.warmup, runs=config.bench.runs)
    first = budget["steps"][0]
    variants = [("fp32", config.model_copy(update={"precision": "fp32", "target_options": {}}), None),
                ("int8", trial_config(config, target, first["float_nodes"], first["int16_tensors"]), first["value"])]
    rows: dict[str, Any] = {}
    log(f"==> timing the mix next to plain int8 and fp32 ({config.bench.runs} runs each, same threads)")
    for name, trial, value in variants:
        with scratch_build(target, source, trial, calib, onnx_path, "budget-") as built:
            size = sum((built.root / f).stat().st_size for f in built.files)
            with _timing_runner(target, built, config, None) as runner:
                rows[name] = {"size_bytes": size, "median_ms": bench_runner(runner, feed, **protocol)["median_ms"],
                              budget["metric"]: value}
    with _timing_runner(target, artifact, config, cand) as runner:
        rows["mix"] = {"size_bytes": sum((artifact.root / f).stat().st_size for f in artifact.files),
                       "median_ms": bench_runner(runner, feed, **protocol)["median_ms"],
                       budget["metric"]: budget["steps"][-1]["value"]}
    for name, r in rows.items():
        log(f"    {name:<5} {r['size_bytes'] / 1e6:8.3f} MB  {r['median_ms']:8.3f} ms  {budget['metric']} "
            f"{'-' if r[budget['metric']] is None else format(r[budget['metric']], '.5g')}")
    return {"rows": rows, "threads": resolve_threads(config.bench.threads), "runs": config.bench.runs,
            "note": "built from the same ONNX by the same target; timed one after the other on one held-out feed "
                    "(fp32's value is not validated here: the budget metric is for int8 variants)"}
