"""`edgeexport compare --task text-generation`: every decoder precision built, validated and timed per token next to
PyTorch eager.

The decoder is exported once (optimum's text-generation-with-past graph) and every target x precision is built from
that graph through ``decoder_build.build``, so each row passes the same generation gate as ``edgeexport build``:
next-token top-1 agreement at decisive positions, KL divergence and the relative change of perplexity on the
held-out text. Timing then runs in interleaved rounds at batch 1 and the same threads: the prefill of one held-out
prompt (the time to first token) and a run of greedy decode steps from that prompt's cache, PyTorch eager with its
own KV cache (one forward per token) against each bundle's loader (``KVDecoder``, the cache in numpy). A row's
latency is per decoded token, so the table's speed-up is the decode tokens/s ratio.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from edgeexport.compare import _LIFTED, Comparison, Row, Settings, choose
from edgeexport.config import BuildConfig, DECODER_TOLERANCES
from edgeexport.errors import EdgeExportError, UsageError, ValidationFailed
from edgeexport.util import tmp_prefix

Log = Callable[[str], None]
PROMPT_TOKENS = 64  # the timed prefill (or half the context, if shorter)
DECODE_STEPS = 32   # greedy decode steps per timed call (fewer if the context ends sooner)


def plan(targets: list[str], precisions: Optional[list[str]]) -> list[Row]:
    """One row per target x decoder precision; a target without a decoder path, or without that precision, is a
    skipped row that says why."""
    from edgeexport.targets import get_target

    rows = []
    for name in targets:
        target = get_target(name)
        asked = precisions or list(target.decoder_precisions) or ["fp32"]
        for precision in asked:
            row = Row(name, precision)
            if not target.decoder_precisions:
                row.status = "skipped"
                row.add_note(f"no decoder path: {target.decoder_refusal}")
            elif precision not in target.decoder_precisions:
                row.status = "skipped"
                row.add_note(f"{name} builds decoders at {', '.join(target.decoder_precisions)}, not {precision}")
            rows.append(row)
    return rows


def _metrics(generation: dict[str, Any]) -> dict[str, Any]:
    keys = ("next_token_top1", "next_token_top1_all", "kl_divergence", "perplexity", "perplexity_reference",
            "perplexity_change", "decisive_positions", "positions")
    out = {k: generation.get(k) for k in keys}
    greedy = generation.get("greedy") or []
    out["greedy_matching"] = [g["matching_prefix"] for g in greedy]
    out["greedy_reference_tokens"] = [g["reference_tokens"] for g in greedy]
    return out


def _build_row(row: Row, config: BuildConfig, exported: Path, log: Log, lifted_in: Optional[Path]) -> None:
    from edgeexport import decoder_build

    t0 = time.perf_counter()
    try:
        out, manifest, report = decoder_build.build(config, log, exported)
    except ValidationFailed as e:
        row.status = "failed"
        row.add_note(f"validation: {e.why}")
        row.validation = e.report.to_dict() if e.report is not None else None
        if lifted_in is not None:
            lifted = config.model_copy(update={
                "tolerance": {k: _LIFTED[k] for k in DECODER_TOLERANCES[config.precision]},
                "out": str(lifted_in / f"{row.target}-{row.precision}")})
            try:
                out, manifest, _ = decoder_build.build(lifted, log, exported)
            except Exception as e2:  # noqa: BLE001 - reported in the row
                row.add_note(f"could not time it: {type(e2).__name__}: {e2}")
            else:
                row.out = out
                row.measure_size(out, manifest)
                row.metrics = _metrics(manifest["validation"]["generation"])
                row.add_note("timed anyway: built again with the limits lifted (that bundle was not kept)")
    except Exception as e:  # noqa: BLE001 - one broken combination is a row, not the end of the comparison
        row.broke(e)
    else:
        row.status, row.out = "passed", out
        row.validation = report.to_dict()
        row.metrics = _metrics(manifest["validation"]["generation"])
        row.measure_size(out, manifest)
    row.build_s = time.perf_counter() - t0


def eager_fns(model: Any, prompt: list[int], steps: int) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """PyTorch eager's prefill of ``prompt`` and its ``steps`` greedy decode steps from that prompt's cache, one
    forward per token with the model's own KV cache (the loop a device app would write; generate() adds its
    logits processing on top)."""
    import torch

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
    cache0, first = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def prefill() -> Any:
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=True).logits

    def decode() -> None:
        with torch.inference_mode():
            # transformers' cache grows in place: crop it back to the prompt afterwards (not timed as a copy)
            cache, token = (cache0 if hasattr(cache0, "crop") else copy.deepcopy(cache0)), first
            for _ in range(steps):
                o = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = o.past_key_values, o.logits[:, -1:].argmax(-1)
            if hasattr(cache0, "crop"):
                cache0.crop(len(prompt))

    return prefill, decode


def per_token(summary: dict[str, Any], steps: int) -> dict[str, Any]:
    """A decode call's timing summary as milliseconds per decoded token."""
    out = {k: (v / steps if k.endswith("_ms") and isinstance(v, float) else v) for k, v in summary.items()}
    out["round_p50_ms"] = [v / steps for v in summary.get("round_p50_ms", [])]
    return out


def _time_all(rows: list[Row], model: Any, prompt: list[int], steps: int, settings: Settings, log: Log
              ) -> dict[str, Any]:
    from edgeexport.bench import decoder_calls, interleaved, set_torch_threads, speedup
    from edgeexport.bundle import loader

    set_torch_threads(settings.threads or 1)
    fns: dict[str, Callable[[], Any]] = {}
    fns["reference prefill"], fns["reference decode"] = eager_fns(model, prompt, steps)
    for row in rows:
        if row.out is None:
            continue
        try:
            dec = loader.load(row.out, threads=settings.threads).decoder()
            fns[f"{row.key} prefill"], fns[f"{row.key} decode"] = decoder_calls(dec, prompt, steps)
        except Exception as e:  # noqa: BLE001 - reported in the row; the others are still timed
            row.add_note(f"latency not measured: its loader failed: {type(e).__name__}: {e}")
    runs = max(5, settings.runs // 5)  # a timed call is a prefill or a whole run of decode steps
    timed = interleaved(fns, min(settings.warmup, 3), runs, settings.rounds, log)
    ref = {"prefill": timed["reference prefill"], "decode": per_token(timed["reference decode"], steps)}
    for row in rows:
        if f"{row.key} decode" not in timed:
            continue
        pre, dec_t = timed[f"{row.key} prefill"], per_token(timed[f"{row.key} decode"], steps)
        row.latency = dec_t
        ratio = speedup(ref["decode"], dec_t)
        dec_t["speedup_by_round"] = ratio["speedup_by_round"]
        row.speedup, row.speedup_noise, row.speedup_range = ratio["speedup"], ratio["noise"], ratio["range"]
        ttft = speedup(ref["prefill"], pre)
        row.generation = {"ttft_ms": pre["p50_ms"], "prefill_tokens_per_s": len(prompt) * 1e3 / pre["p50_ms"],
                          "decode_tokens_per_s": 1e3 / dec_t["p50_ms"], "prefill": pre,
                          "prefill_speedup": ttft["speedup"], "prefill_speedup_noise": ttft["noise"]}
        if ratio["noise"]:
            row.add_note(f"speed-up not supported by the spread ({ratio['noise']}): the machine was busy; "
                         "rerun on an idle machine")
    return {"latency": ref["decode"], "generation": {
        "ttft_ms": ref["prefill"]["p50_ms"], "prefill_tokens_per_s": len(prompt) * 1e3 / ref["prefill"]["p50_ms"],
        "decode_tokens_per_s": 1e3 / ref["decode"]["p50_ms"], "prefill": ref["prefill"]},
        "runs": runs}


def run(base: BuildConfig, targets: list[str], precisions: Optional[list[str]], settings: Settings,
        out_root: Optional[Path] = None, log: Log = print, command: str = "", focus: Optional[str] = None
        ) -> Comparison:
    """Build, validate and time every decoder precision (the CLI's compare runs this for --task
    text-generation)."""
    from edgeexport import decoder_build
    from edgeexport.bench import machine, resolve_threads, runtime_versions
    from edgeexport.compare import _step_log
    from edgeexport.source_hf import export_with_past
    from edgeexport.targets import all_targets, get_target
    from edgeexport.util import heartbeat, quiet

    unknown = [p for p in precisions or [] if p not in DECODER_TOLERANCES]
    if unknown:
        raise UsageError(f"--precisions names {', '.join(unknown)}, which no target builds for decoders",
                         f"decoder precisions are {', '.join(DECODER_TOLERANCES)}", "pass some of those")
    if not any(get_target(t).decoder_precisions for t in targets):
        able = [t.name for t in all_targets() if t.decoder_precisions and t.public]
        raise UsageError(f"none of --targets {','.join(targets)} builds decoders",
                         "; ".join(f"{t}: {get_target(t).decoder_refusal}" for t in targets),
                         f"compare decoders with --targets {','.join(able)}")
    settings = dataclasses.replace(settings, threads=resolve_threads(settings.threads))
    rows = plan(targets, precisions)
    if focus is not None and focus not in [r.key for r in rows]:
        raise UsageError(f"--focus {focus!r} is not one of the compared combinations",
                         f"they are {', '.join(r.key for r in rows)}", "pass one of them, as TARGET/PRECISION")
    probe_target = next(t for t in targets if get_target(t).decoder_precisions)
    probe = base.model_copy(update={"target": probe_target, "precision": "fp32", "target_options": {}})
    decoder_build.check(probe)
    text = decoder_build.text_file(base)
    dec = decoder_build.Decoder(base.model)
    wins, _prompts, data = decoder_build.held_out(base, dec, text)
    context = dec.context or 1 << 30
    prompt = [t for w in wins for t in w][: min(PROMPT_TOKENS, max(1, context // 2))]
    steps = max(1, min(DECODE_STEPS, context - len(prompt) - 1))
    quiet_log = _step_log(log, "      ")
    with tempfile.TemporaryDirectory(prefix=tmp_prefix("compare-")) as tmp:
        root = out_root or Path(tmp) / "bundles"
        exported = Path(tmp) / "exported.onnx"
        log(f"==> exporting {base.model} once with optimum (text-generation-with-past)")
        with heartbeat(log, "exporting"):
            export_with_past(dec.folder, exported, base.opset)
        todo = [r for r in rows if r.status == "pending"]
        for i, row in enumerate(todo, 1):
            target = get_target(row.target)
            opts = {k: v for k, v in base.target_options.items() if k in target.options_spec}
            config = base.model_copy(update={"target": row.target, "precision": row.precision, "target_options": opts,
                                             "out": str(root / f"{row.target}-{row.precision}"), "force": True,
                                             "archive": None})
            try:  # settings this row's target or precision refuses (an option for another precision): skipped
                decoder_build.check(config)
            except EdgeExportError as e:
                row.status = "skipped"
                row.add_note(f"{e.what}" + (f": {e.why}" if e.why else "") + (f" ({e.fix})" if e.fix else ""))
                log(f"[{i}/{len(todo)}] {row.key}: skipped ({row.reason})")
                continue
            log(f"[{i}/{len(todo)}] {row.key}: building and validating")
            _build_row(row, config, exported, quiet_log, Path(tmp) / "refused" if settings.time_failed else None)
            log(f"[{i}/{len(todo)}] {row.key}: {row.status}" + (f" ({row.reason})" if row.reason else "")
                + (f" in {row.build_s:.1f} s" if row.build_s is not None else ""))
        with quiet():
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(dec.folder)).eval()
        log(f"==> timing: prefill of {len(prompt)} tokens and {steps} decode steps, PyTorch eager and each bundle")
        ref = _time_all(rows, model, prompt, steps, settings, log)
        for row in rows:
            if out_root is None or row.status != "passed":
                row.out = None  # only bundles that passed and were asked to be kept are reported
    reference = {"kind": "PyTorch eager fp32", "latency": ref["latency"], "generation": ref["generation"],
                 "size_bytes": sum(p.numel() * p.element_size() for p in model.parameters()), "gflops_per_s": None}
    protocol = {"warmup": min(settings.warmup, 3), "runs_per_round": ref["runs"], "rounds": settings.rounds,
                "threads": settings.threads,
                "threads_note": "PyTorch and every runtime ran with this many threads (--threads; default: the CPUs "
                                "this process may use)", "batch": 1,
                "feed_shapes": {"prompt_tokens": [1, len(prompt)]}, "prompt_tokens": len(prompt), "decode_steps": steps,
                "timed": f"the prefill of a {len(prompt)}-token held-out prompt (time to first token) and {steps} greedy "
                         "decode steps from its cache, each a timed call: PyTorch eager with its own KV cache (one "
                         "forward per token), each bundle through its loader's KV-cache decoder; latency is per "
                         "decoded token",
                "machine": machine(), "versions": runtime_versions(),
                "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result = Comparison(base.model, rows, reference, data, protocol, "next_token_top1", None, command, kind="decoder")
    result.chosen = choose(rows)
    result.focus = next((r for r in rows if r.key == focus), None) or result.chosen
    return result
