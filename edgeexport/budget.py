"""Accuracy budget: quantize, and while the budget is not met, keep the layers that add the most error in float.

Each round builds the int8 model with the current float exclusions, validates it on the held-out samples (the same
comparison as the gate), and, if the budget metric is still short, ranks the layers on calibration samples (never
the held-out ones) by the error they add (:mod:`edgeexport.sensitivity`) and moves the next worst ones to float:
one layer, then two, four, ... (each with its consumers, so that its output is no longer quantized). It stops when
the budget holds, when nothing is left to move, when more than ``MAX_FLOAT_SHARE`` of the layers would be float,
or after ``config.budget_steps`` rounds; then it fails with the best value it reached.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from edgeexport.config import BUDGET_METRICS, BuildConfig
from edgeexport.errors import ValidationFailed
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
    from edgeexport.pipeline import holdout_report

    with source.reference(config.inputs, output_names) as ref, target.load(artifact, config.bench.threads) as cand:
        return holdout_report(ref, cand, config, calib)[0]


def _weighted_nodes(float_model: Path) -> set[str]:
    import onnx

    from edgeexport.sensitivity import WEIGHTED

    return {n.name for n in onnx.load(str(float_model)).graph.node if n.op_type in WEIGHTED}


def search(config: BuildConfig, source: Any, calib: Any, onnx_path: Path, output_names: list[str], log: Log
           ) -> tuple[BuildConfig, dict[str, Any]]:
    """Find float exclusions that meet ``config.accuracy_budget``. Returns the config to build and the record."""
    from edgeexport.sensitivity import label, rank_layers
    from edgeexport.targets import get_target

    (metric, limit), = config.accuracy_budget.items()
    target = get_target(config.target)
    excluded = list(config.target_options.get("exclude_nodes") or [])
    steps: list[dict[str, Any]] = []
    best: Optional[dict[str, Any]] = None
    feeds = [f for f, _ in zip(calib.calibration(), range(RANK_SAMPLES))]
    weighted: set[str] = set()
    relation = ">=" if BUDGET_METRICS[metric] == "min" else "<="
    log(f"==> accuracy budget: {metric} {relation} {limit:g} on {len(calib.holdout_idx)} held-out samples")
    for step in range(config.budget_steps + 1):
        options = {**config.target_options, "exclude_nodes": excluded}
        if "engine" in target.options_spec:
            options["engine"] = "deferred"  # trial rounds validate the ONNX; only the final build makes an engine
        trial = config.model_copy(update={"target_options": options})
        with tempfile.TemporaryDirectory(prefix=tmp_prefix("budget-")) as tmp:
            work = Path(tmp)
            shutil.copyfile(onnx_path, work / "exported.onnx")
            artifact = target.build(source, trial, calib, work, work / "exported.onnx")
            value = budget_value(validate(trial, source, calib, artifact, target, output_names), metric)
            record = {"step": step, "float_nodes": list(excluded), "value": value, "met": met(value, metric, limit)}
            steps.append(record)
            log(f"    step {step}: {len(excluded)} node(s) in float -> {metric} = "
                f"{'n/a' if value is None else f'{value:.5g}'} ({'met' if record['met'] else 'short'})")
            if value is not None and (best is None or _better(value, best["value"], metric)):
                best = record
            if record["met"]:
                break
            if artifact.float_model is None:
                break
            ranked = rank_layers(artifact.float_model, artifact.model_path, feeds)
            weighted = weighted or _weighted_nodes(artifact.float_model)  # the float graph is the same every round
            record["worst"] = [{k: r[k] for k in ("node", "module", "op_type", "nodes", "added_noise_db", "snr_db")}
                               for r in ranked[:5]]
            fresh = [r for r in ranked if r["added_noise"] > 0 and not set(r["nodes"]) <= set(excluded)]
            if step == 0 and ranked:
                log("    worst layers: " + ", ".join(f"{label(r)} ({r['added_noise_db']:.1f} dB)" for r in ranked[:3]))
            moved = [n for r in fresh[: 2 ** step] for n in r["float_fallback"]]
            moved = [n for n in dict.fromkeys(moved) if n not in excluded]
            share = len(weighted & (set(excluded) | set(moved))) / max(1, len(weighted))
            if not moved or share > MAX_FLOAT_SHARE:
                log("    stopping: " + ("no layer left to move to float" if not moved else
                                         f"more than {MAX_FLOAT_SHARE:.0%} of the layers would be float"))
                break
            excluded += moved
    result = {"metric": metric, "limit": limit, "relation": relation, "steps": steps,
              "float_nodes": steps[-1]["float_nodes"] if steps[-1]["met"] else None,
              "met": steps[-1]["met"], "ranked_on": f"{len(feeds)} calibration samples"}
    if not steps[-1]["met"]:
        reached = "n/a" if best is None else f"{best['value']:.5g}"
        err = ValidationFailed(
            f"accuracy budget not met: {metric} {relation} {limit:g} was not reached; no bundle was written",
            f"best reachable {metric} = {reached} with "
            f"{0 if best is None else len(best['float_nodes'])} node(s) in float, after {len(steps)} round(s)",
            "relax the budget, try another --calib-method, raise --budget-steps, or use a higher precision")
        err.budget = result  # type: ignore[attr-defined]
        raise err
    final = config.model_copy(update={"target_options": {**config.target_options,
                                                         "exclude_nodes": steps[-1]["float_nodes"]}})
    return final, result
