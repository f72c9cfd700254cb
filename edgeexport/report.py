"""Human-readable summaries of a manifest: report.md in the bundle and `edgeexport inspect`."""

from __future__ import annotations

from typing import Any


def _f(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return "-" if v is None else str(v)


def validation_rows(manifest: dict[str, Any]) -> list[str]:
    val = manifest.get("validation") or {}
    lines = ["| output | kind | max abs | mean abs | rel err | cosine | SNR dB | top-1 | decisions flipped |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in (val.get("outputs") or {}).items():  # token outputs: unpadded cosine/SNR (what is checked)
        cos, snr = m.get("cosine_unpadded", m.get("cosine")), m.get("snr_db_unpadded", m.get("snr_db"))
        lines.append(f"| {name} | {m.get('kind', '-')} | {_f(m.get('max_abs'))} | {_f(m.get('mean_abs'))} | "
                     f"{_f(m.get('rel_err'))} | {_f(cos, 6)} | {_f(snr)} | {_f(m.get('top1'))} | "
                     f"{_f(m.get('flip_rate'))} |")
    stream = val.get("stream")
    if stream:
        pairs = ", ".join(f"{i} <- {o}" for i, o in stream["pairs"].items())
        lines += ["", f"Streamed validation ({pairs}): each model fed its own state; mean absolute error by position "
                  f"in the stream ({', '.join(stream['by_part'])}):", ""]
        lines += [f"- {name}: {', '.join(_f(v) for v in stream[name])}" for name in val["outputs"] if name in stream]
    return lines


def render_markdown(manifest: dict[str, Any]) -> str:
    cal = manifest.get("calibration", {})
    val = manifest.get("validation", {})
    lines = [
        f"# edgeexport bundle: {manifest['target']} / {manifest['precision']}",
        "",
        f"- precision: {manifest.get('precision_label', manifest['precision'])}",
        f"- model file: `{manifest['model_file']}` (source: `{manifest.get('source', {}).get('spec')}`)",
        "- inputs: " + ", ".join(f"`{i['name']}` {i['shape']} {i['dtype']}" for i in manifest["inputs"]),
        "- outputs: " + ", ".join(f"`{o['name']}` {o['shape']} {o['dtype']}" for o in manifest["outputs"]),
        f"- calibration data: `{cal.get('source')}` ({cal.get('calibration_samples')} calibration / "
        f"{cal.get('holdout_samples')} held-out samples, sha256 {str(cal.get('sha256'))[:16]}...)"
        + (" **SYNTHETIC random data**" if cal.get("synthetic") else ""),
        "",
        f"## Validation: {'PASSED' if val.get('passed') else 'FAILED'} on {val.get('samples')} held-out samples",
        "",
        f"Validated with: {val.get('runtime', manifest['target'] + ' runtime')}.",
        "",
        *validation_rows(manifest),
        "",
    ]
    task = val.get("task")
    if task:
        lines += [f"Task accuracy ({task['samples']} labelled samples): reference {task['reference_accuracy']:.2%}, "
                  f"built {task['accuracy']:.2%}, drop {task['drop_points']:+.2f} points.", ""]
    lines += ["Checks:", ""] + [
        f"- {'ok' if c['passed'] else 'FAIL'}: {c['output']} {c['metric']} = {_f(c['value'])} "
        f"({'>=' if c['kind'] == 'min' else '<='} {_f(c['limit'])})" for c in val.get("checks", [])]
    bench = manifest.get("benchmark")
    if bench and bench.get("skipped"):
        lines += ["", f"Latency: not measured ({bench['skipped']})."]
    elif bench:
        lines += ["", "## Latency (batch of one held-out sample)", "",
                  "| model | median ms | p90 ms |", "|---|---|---|",
                  f"| reference | {_f(bench['reference']['median_ms'])} | {_f(bench['reference']['p90_ms'])} |",
                  f"| built | {_f(bench['built']['median_ms'])} | {_f(bench['built']['p90_ms'])} |",
                  "", f"Reference: {bench.get('reference_kind', 'the source model in its own framework')}.",
                  "", f"Speed-up vs reference: {speedup_text(bench)} "
                  f"({bench['machine'].get('cpu', bench['machine'].get('machine'))}, threads {bench.get('threads') or 'default'}"
                  " for both)."]
    lines += _recipe_lines(manifest) + _pruning_lines(manifest) + _budget_lines(manifest) + _layer_lines(manifest)
    if manifest.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in manifest["notes"]]
    device = (manifest.get("runtime_config") or {}).get("device_commands") or \
        ["pip install -r requirements.txt", "python loader.py --selftest"]
    lines += ["", "## On the device", "", "```", *device, "```", ""]
    return "\n".join(lines)


def _pruning_lines(manifest: dict[str, Any]) -> list[str]:
    p = manifest.get("pruning")
    if not p:
        return []
    lines = ["", f"## Pruned before export: {p['method']} {p['amount']:g}", "", f"- {p['summary']}.",
             f"- {p['note'][0].upper()}{p['note'][1:]}.",
             f"- Model file compressed (zlib): {p['model_file_deflated_bytes'] / 1024:,.1f} KiB.",
             f"- Never pruned (they set the outputs' shapes): {', '.join(f'`{n}`' for n in p['protected_layers']) or 'none'}.",
             f"- Validated against {p['reference']}, with the limits for pruned models (docs/pruning.md)."]
    r = p.get("recovery")
    lines.append(f"- Recovery: {r['steps']} steps, {r['objective']}, on the {r['samples']}; loss {r['loss_first10']:.4g} "
                 f"-> {r['loss_last10']:.4g}." if r else "- No recovery training (--finetune-steps 0).")
    return lines


def _budget_lines(manifest: dict[str, Any]) -> list[str]:
    b = manifest.get("accuracy_budget")
    if not b:
        return []
    lines = ["", f"## Accuracy budget: {b['metric']} {b['relation']} {b['limit']:g} "
                 f"({'met' if b['met'] else 'not met'})", "",
             "| step | tensors in int16 | nodes in float | value | met |", "|---|---|---|---|---|"]
    lines += [f"| {s['step']}{' (give back)' if s.get('give_back') else ''} | {len(s.get('int16_tensors') or [])} | "
              f"{len(s['float_nodes'])} | {_f(s['value'])} | {'yes' if s['met'] else 'no'} |" for s in b["steps"]]
    if b.get("int16_tensors"):
        lines += ["", "16-bit activations: " + ", ".join(f"`{n}`" for n in b["int16_tensors"])]
    if b.get("float_nodes"):
        lines += ["", "Kept in float: " + ", ".join(f"`{n}`" for n in b["float_nodes"])]
    c = b.get("compared")
    if c:
        lines += ["", f"Next to plain int8 and fp32 (same target and ONNX, {c['runs']} runs each, threads "
                      f"{c['threads'] or 'runtime default'}):", "", f"| build | size MB | median ms | {b['metric']} |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {r['size_bytes'] / 1e6:.3f} | {r['median_ms']:.3f} | {_f(r.get(b['metric']))} |"
                  for name, r in c["rows"].items()]
    return lines


def _recipe_lines(manifest: dict[str, Any]) -> list[str]:
    """How the precision was reached, and how much of the model really is integer."""
    q = manifest.get("quantization") or {}
    share = q.get("integer_share")
    if not q.get("recipe") and not share and not q.get("weight_rounding"):
        return []
    lines = ["", "## Quantization recipe", ""]
    keys = ("quantizer", "converter", "recipe", "graph_family", "calibration_method", "calibration_method_requested",
            "percentile", "percentile_ranges_narrowed", "calibration_samples", "weight_type", "activation_type",
            "per_channel", "device", "reduce_range", "weight_rounding", "gptq_layers", "gptq_samples",
            "bias_correction", "bias_corrected_layers", "unquantized_outputs_of", "int16_tensors", "exclude_nodes")
    lines += [f"- {k}: `{q[k]}`" for k in keys if k in q and q[k] not in (None, [], "")]
    sq = q.get("smoothquant")
    if isinstance(sq, dict) and sq.get("smoothed_matmuls"):
        lines.append(f"- smoothquant: {sq['smoothed_matmuls']} MatMuls behind {sq['activation_tensors']} smoothed "
                     f"activations (median strength {sq['alpha_median']:g}, simulated int8 error "
                     f"{sq['simulated_error_reduction']} lower); {sq['left_alone']} activations left alone")
    if share and "decided_by" in share:
        lines.append(f"- really integer: decided by {share['decided_by']}")
    elif share:
        lines.append(f"- really integer: {share['integer_mac_share']:.1%} of the multiply-adds, "
                     f"{share['integer_weight_share']:.1%} of the weight bytes ({share['float_weighted_layers']} of "
                     f"{share['weighted_layers']} weighted layers stayed float)")
    return lines


def _layer_lines(manifest: dict[str, Any], top: int = 10) -> list[str]:
    le = manifest.get("layer_errors")
    if not le:
        return []
    lines = ["", f"## Layers adding the most error ({le['samples']} held-out samples)", "",
             f"Measure: {le['measure']}.", "", "| rank | layer | op | depth | SNR dB | inputs dB | own noise dB | added noise dB |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {i} | {r.get('module') or '-'} `{r['node']}` | {r['op_type']} | {r['depth']} | {_f(r['snr_db'])} | "
              f"{_f(r['input_snr_db'])} | {_f(r.get('local_noise_db'))} | {_f(r['added_noise_db'])} |"
              for i, r in enumerate(le["ranked"][:top], 1)]
    if le.get("plot"):
        lines += ["", f"![output SNR along the depth of the network]({le['plot']})"]
    return lines


def inspect_text(manifest: dict[str, Any]) -> str:
    files = manifest.get("files", [])
    size = sum(f.get("size", 0) for f in files if f.get("path") == manifest.get("model_file"))
    q = manifest.get("quantization", {})
    lines = [
        f"target:     {manifest['target']}",
        f"precision:  {manifest.get('precision_label', manifest['precision'])}",
        f"model file: {manifest['model_file']} ({size / 1024:.1f} KiB)",
        f"created:    {manifest.get('created')} with " + ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items()),
        "runtime:    " + ", ".join(f"{k}>={v}" for k, v in manifest.get("runtime", {}).items()),
        "inputs:",
        *[f"  {i['name']}: {i['shape']} {i['dtype']}" for i in manifest["inputs"]],
        "outputs:",
        *[f"  {o['name']}: {o['shape']} {o['dtype']}" for o in manifest["outputs"]],
        "quantization: " + (", ".join(f"{k}={v}" for k, v in q.items()) or "none"),
    ]
    stats = manifest.get("model_stats") or {}
    if stats.get("flops_per_sample"):
        found = "/".join(op for op, n in (stats.get("by_op") or {}).items() if n) or "Conv/MatMul/Gemm"
        lines.append(f"model:      {stats['params'] / 1e6:.3g} M parameters, {stats['flops_per_sample'] / 1e9:.3g} GFLOP "
                     f"per sample ({found})")
    if manifest.get("pruning"):
        lines.append(f"pruning:    {manifest['pruning']['summary']}")
    cal = manifest.get("calibration", {})
    gen = (manifest.get("validation") or {}).get("generation")
    if gen:  # a decoder (--task text-generation): held-out text and the generation metrics
        lines.append(f"held-out:   {cal.get('source')} ({cal.get('windows')} windows, {cal.get('tokens')} tokens; "
                     "validation only)")
        top1 = (f"{gen['next_token_top1']:.4f} at {gen['decisive_positions']} decisive positions"
                if gen.get("next_token_top1") is not None else "not checked (no decisive positions)")
        lines += ["validation:", f"  next-token top-1 {top1}, {gen['next_token_top1_all']:.4f} at all "
                  f"{gen['positions']}; KL {gen['kl_divergence']:.3g} nats/token; perplexity {gen['perplexity']:.3f} "
                  f"vs {gen['perplexity_reference']:.3f} ({100 * gen['perplexity_change']:+.2f}%)",
                  *[f"  greedy {g['prompt']!r}: {g['matching_prefix']} of {g['reference_tokens']} tokens as the "
                    "reference" for g in gen.get("greedy", [])],
                  f"generation: context {manifest['generation']['context']}, stop ids "
                  f"{manifest['generation']['stop_ids']}, {len(manifest['generation']['golden'])} golden continuations"]
    else:
        lines.append(f"calibration: {cal.get('source')} ({cal.get('calibration_samples')} calib / "
                     f"{cal.get('holdout_samples')} holdout){' SYNTHETIC' if cal.get('synthetic') else ''}")
        lines += ["validation:", *["  " + r for r in validation_rows(manifest)]]
    bench = manifest.get("benchmark")
    if bench and not bench.get("skipped"):
        lines.append(f"latency:    built {bench['built']['median_ms']:.3f} ms vs reference "
                     f"{bench['reference']['median_ms']:.3f} ms ({speedup_text(bench)})")
        if bench.get("reference_kind"):
            lines.append(f"reference:  {bench['reference_kind']}")
    lines.append(f"files:      {len(files)} with sha256")
    return "\n".join(lines)


def speedup_text(bench: dict) -> str:
    """A build benchmark's speed-up as a reader should take it: the ratio, or why the spread does not support one."""
    ratio = bench.get("speedup_vs_reference")
    if ratio is None:
        return "not measured"
    if bench.get("speedup_supported", True):
        from edgeexport.bench import format_speedup

        return format_speedup({"speedup": ratio, "range": bench.get("speedup_range")})
    return f"no speed-up given: the timing was noisy ({bench.get('noise')}); time it on an idle machine"
