"""When the gate refuses an int8 build: measure what would help instead of guessing.

The refused artifact's layers are ranked (their own quantization noise, on calibration samples), then a few
alternatives are each built and validated exactly as the gate would: 16-bit activations (or float) for the worst
layer, and the target's own trial options (another calibration method, 8-bit weights where 7 were used, ...).
The refusal then says which of them helped and by how much, so the advice is a measurement of this model, never
a generic list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from edgeexport.config import BuildConfig

Log = Callable[[str], None]
#: alternatives built and validated after a refusal (each costs one build)
MAX_TRIALS = 3


def trials(config: BuildConfig, target: Any, worst: list[dict[str, Any]], used_method: str = ""
           ) -> list[tuple[str, str, BuildConfig]]:
    """(what it is, how to ask for it, the config) of each alternative to try, most targeted first.
    ``used_method``: the calibration method the refused build used (what ``auto`` resolved to)."""
    from edgeexport.budget import trial_config

    result = []
    if worst and config.precision == "int8" and not target.layer_fallback(config):
        w = worst[0]
        excluded = list(config.target_options.get("exclude_nodes") or [])
        wide = list(config.target_options.get("int16_tensors") or [])
        if "int16_tensors" in target.options_spec and w["quantized_output"]:
            result.append((f"16-bit activations for {w['output']} (output of the worst layer, {_name(w)})",
                           f"--option int16_tensors=[{w['output']}]",
                           trial_config(config, target, excluded, wide + [w["output"]])))
        else:
            result.append((f"the worst layer ({_name(w)}) in float",
                           f"--option exclude_nodes=[{','.join(w['float_fallback'])}]",
                           trial_config(config, target, excluded + w["float_fallback"], wide)))
    result += target.trial_options(config)
    if config.precision == "int8":
        for method in target.calib_methods:
            if method not in (config.calibration.method, used_method):
                cal = config.calibration.model_copy(update={"method": method})
                result.append((f"{method} calibration", f"--calib-method {method}",
                               config.model_copy(update={"calibration": cal})))
    return result[:MAX_TRIALS]


def _name(row: dict[str, Any]) -> str:
    from edgeexport.sensitivity import label

    return label(row)


def run(config: BuildConfig, source: Any, calib: Any, onnx_path: Path, output_names: list[str], target: Any,
        artifact: Any, report: Any, log: Log) -> dict[str, Any]:
    """Rank the refused build's layers, try the alternatives, and return the record (with an ``advice`` line)."""
    from edgeexport.budget import RANK_SAMPLES, scratch_build, validate
    from edgeexport.recipes import take
    from edgeexport.sensitivity import rank_layers

    worst: list[dict[str, Any]] = []
    if artifact.float_model is not None:
        worst = rank_layers(artifact.float_model, artifact.model_path, take(calib.calibration(), RANK_SAMPLES))[:3]
    todo = trials(config, target, worst, artifact.settings.get("calibration_method", ""))
    failing = report.failures()
    record: dict[str, Any] = {"worst_layers": [{"layer": _name(r), "output": r["output"],
                                                "own_noise_db": round(r["local_noise_db"], 2)} for r in worst],
                              "tried": []}
    if not todo:
        return {**record, "advice": ""}
    log(f"==> refused: trying {len(todo)} alternative(s) to see what helps (--no-diagnose skips this)")
    if worst:
        log("    worst layers (own quantization noise): "
            + ", ".join(f"{_name(r)} ({r['local_noise_db']:.1f} dB)" for r in worst))
    for label, how, trial in todo:
        try:
            with scratch_build(target, source, trial, calib, onnx_path, "diagnose-") as built:
                r = validate(trial, source, calib, built, target, output_names)
        except Exception as e:  # an alternative that cannot be built is a finding, not a crash
            record["tried"].append({"what": label, "how": how, "error": f"{type(e).__name__}: {str(e)[:160]}"})
            log(f"    {label}: could not be built ({type(e).__name__})")
            continue
        after = {(c.output, c.metric): c.value for c in r.checks}
        row = {"what": label, "how": how, "passed": r.passed,
               "values": {f"{c.output} {c.metric}": [c.value, after.get((c.output, c.metric))] for c in failing}}
        record["tried"].append(row)
        log(f"    {label}: " + ", ".join(f"{k} {a:.4g} -> {'n/a' if b is None else f'{b:.4g}'}"
                                       for k, (a, b) in row["values"].items())
            + (" (passes)" if r.passed else ""))
    helped = [t for t in record["tried"] if "values" in t and _helps(t, failing)]
    if helped:
        best = next((t for t in helped if t["passed"]), helped[0])
        record["advice"] = (f"measured on this model: {best['what']} {'passes' if best['passed'] else 'helps'} ("
                            + ", ".join(f"{k} {a:.4g} -> {b:.4g}" for k, (a, b) in list(best["values"].items())[:2])
                            + f"): {best['how']}")
    else:
        record["advice"] = ("none of " + ", ".join(t["what"] for t in record["tried"]) + " helped on this model")
    return record


def _helps(trial: dict[str, Any], failing: list[Any]) -> bool:
    """True when every failing check (a validate.Check, whose ``kind`` says floor or ceiling) moved the right way,
    and at least one strictly."""
    moved = []
    for c, (a, b) in zip(failing, trial["values"].values()):
        if b is None:
            return False
        moved.append((b - a) if c.kind == "min" else (a - b))
    return all(m >= 0 for m in moved) and any(m > 0 for m in moved)
