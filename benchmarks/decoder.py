#!/usr/bin/env python3
"""A small GPT-2 decoder (trained here on pydoc_data.topics, edgeexport.models.decoder) with its KV cache:
PyTorch eager fp32 against onnxruntime at fp32, fp16 and weight-only int8 / int4 (MatMulNBits), side by side.

For each variant, at batch 1 and the same threads: time to first token (the prefill of a 64-token prompt), prefill
tokens/s, decode tokens/s (32 steps from the same prefilled cache), model bytes and the peak memory of a fresh
process running the variant;
accuracy on held-out paragraphs the decoder never saw: next-token top-1 agreement with PyTorch (teacher-forced),
perplexity and its change, and greedy continuations compared token by token. PyTorch runs the same loop (one
forward per token, its own KV cache) and, as a second row, transformers' ``generate``.

Timing is interleaved (every variant once per round, several rounds); a ratio is printed only as far as the
rounds agree. Decode speed is also set against the machine's measured memory copy bandwidth: weight bytes read
per token x tokens/s (a model this small sits in the CPU caches, so it can exceed the DRAM figure).

    python benchmarks/decoder.py [--threads 2] [--rounds 5] [--steps 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent
PROMPT = 64        # prompt tokens for the prefill
WINDOWS = 40       # held-out windows of 128 tokens for the teacher-forced metrics
GREEDY = 32        # greedy tokens per prompt compared with PyTorch
#: issue 21's goal: weight-only int4 decode >= 2x PyTorch eager fp32 tokens/s, perplexity within 5% of float
GOAL_SPEEDUP, GOAL_PPL = 2.0, 0.05


def variants(src: Path, work: Path) -> dict[str, tuple[Path, dict]]:
    import shutil

    from edgeexport.quantize import to_fp16
    from edgeexport.weightonly import quantize_weight_only

    out: dict[str, tuple[Path, dict]] = {"ort fp32": (src, {})}
    shutil.copyfile(src, work / "fp16.onnx")
    out["ort fp16"] = (work / "fp16.onnx", to_fp16(src, work / "fp16.onnx"))
    for bits in (8, 4):
        dst = work / f"int{bits}.onnx"
        out[f"ort int{bits} weight-only"] = (dst, quantize_weight_only(src, dst, bits, block_size=32))
    # what the int4 defaults buy: the output layer at 4 bits too, and the token table at 4 bits too
    dst = work / "int4-all.onnx"
    out["ort int4 output_bits=4 embeddings=int4"] = (dst, quantize_weight_only(src, dst, 4, block_size=32,
                                                                                output_bits=4, embeddings=True))
    return out


def weight_bytes(path: Path) -> int:
    """Bytes of the constants a decode step reads in full: the weights of MatMul/Gemm/MatMulNBits nodes and
    their scales (an embedding Gather reads one row per token, left out)."""
    import onnx

    model = onnx.load(str(path))
    sizes = {t.name: len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    names = {i for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "MatMulNBits") for i in n.input[1:]}
    return sum(sizes.get(n, 0) for n in names)


def copy_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """GB/s of a large numpy copy (bytes read + written), best of ``repeats``."""
    a = np.ones(mb * 2**20 // 8)
    b = np.empty_like(a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(repeats))
    return 2 * a.nbytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


#: a fresh process that loads one variant and runs the timed prefill and decode once, then prints its peak resident
#: memory (KiB, Linux VmHWM): what a device process running only that model needs, imports included
_CHILD = r"""
import json, sys
import numpy as np
kind, path, threads, prompt, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
if kind == "torch":
    import torch
    from transformers import GPT2LMHeadModel
    torch.set_num_threads(threads)
    model = GPT2LMHeadModel.from_pretrained(path).eval()
    with torch.inference_mode():
        o = model(input_ids=torch.tensor([prompt]), use_cache=True)
        cache, t = o.past_key_values, o.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            o = model(input_ids=t, past_key_values=cache, use_cache=True)
            cache, t = o.past_key_values, o.logits[:, -1:].argmax(-1)
else:
    import onnxruntime as ort
    from edgeexport.bundle.loader import KVDecoder
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    dec = KVDecoder(ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]))
    logits, past = dec.step(np.asarray([prompt]), dec.empty())
    for _ in range(steps):
        logits, past = dec.step(logits[:, -1].argmax(-1)[:, None], past)
# VmHWM: this process's own peak (ru_maxrss would count the parent's memory at fork/exec on Linux)
peak = int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:")))
print(json.dumps({"peak_rss_kib": peak}))
"""


def fresh_peak_mb(kind: str, path: Path | str, threads: int, prompt: list[int], steps: int) -> float:
    """Peak resident memory (MiB) of a new process that loads the variant and runs one prefill and ``steps``
    decode steps (median of 3 processes)."""
    import subprocess

    # transformers would import TensorFlow and JAX where they are installed (they are here, for other targets):
    # a PyTorch app on a device has neither
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT.parent), os.environ.get("PYTHONPATH", "")]),
               USE_TF="0", USE_FLAX="0", USE_JAX="0")
    peaks = []
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", _CHILD, kind, str(path), str(threads), json.dumps(prompt),
                               str(steps)], capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"the fresh process for {path} failed: {proc.stderr.strip()[-500:]}")
        peaks.append(json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_kib"] / 1024)
    return float(np.median(peaks))


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed call")
    ap.add_argument("--runs", type=int, default=20, help="timed calls per round")
    args = ap.parse_args()

    import onnxruntime as ort
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from edgeexport import bench
    from edgeexport.bench import decoder_calls
    from edgeexport.compare_decoder import eager_fns
    from edgeexport.generation import KVDecoder, generation_metrics, position_stats, windows
    from edgeexport.models import decoder as D
    from edgeexport.source_hf import export_with_past

    torch.set_num_threads(args.threads)
    folder = D.decoder_path(progress=lambda s: print(s, file=sys.stderr, flush=True))
    info = json.loads((Path(folder) / "training.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    eos = tok.eos_token_id
    held = np.concatenate([tok(t)["input_ids"] + [eos] for t in D.held_out_text()])
    wins = windows(held[: 128 * WINDOWS], 128)
    prompts = [tok(p)["input_ids"] for p in D.prompts(4)]
    prompt = held[:PROMPT][None]
    work = Path(tempfile.mkdtemp(prefix="decoder-bench-"))
    src = work / "model.onnx"
    export_with_past(folder, src)
    print(f"exported {src.stat().st_size / 1e6:.1f} MB", file=sys.stderr)
    built = variants(src, work)

    with torch.inference_mode():  # the reference: teacher-forced logits, greedy continuations
        ref = [model(input_ids=torch.tensor([w])).logits[0].numpy() for w in wins]
        ref_gen = []
        for p in prompts:
            g = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=GREEDY, do_sample=False, pad_token_id=eos)[0, len(p):].tolist()
            ref_gen.append(g[:g.index(eos)] if eos in g else g)
    base = generation_metrics([position_stats(r, r, w) for r, w in zip(ref, wins)])

    rows: dict[str, dict] = {}
    fns: dict[str, object] = {}
    # the same two timed calls on every side (compare --task text-generation times them too)
    torch_prefill, torch_decode = eager_fns(model, [int(t) for t in prompt[0]], args.steps)
    x = torch.from_numpy(prompt)

    def torch_generate():
        with torch.inference_mode():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.steps,
                           min_new_tokens=args.steps, do_sample=False, pad_token_id=eos)

    fns["pytorch eager fp32 prefill"] = torch_prefill
    fns["pytorch eager fp32 decode"] = torch_decode
    fns["pytorch generate() fp32 e2e"] = torch_generate
    rows["pytorch eager fp32"] = {"bytes": sum(p.numel() * 4 for p in model.parameters()),
                                  "weight_bytes": sum(p.numel() * 4 for n, p in model.named_parameters()
                                                      if n.endswith(".weight") and p.ndim == 2 and "wpe" not in n
                                                      and "wte" not in n) + model.lm_head.weight.numel() * 4,
                                  "ppl": base["perplexity_reference"], "top1": 1.0, "top1_all": 1.0, "kl": 0.0,
                                  "greedy": [len(g) for g in ref_gen]}
    for name, (path, settings) in built.items():
        before = rss_mb()
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = args.threads, 1, 3
        dec = KVDecoder(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]),
                        context=model.config.n_positions)
        gm = generation_metrics([position_stats(r, dec.step(np.asarray([w]), dec.empty())[0][0], w)
                                 for r, w in zip(ref, wins)])
        ppl = gm["perplexity"]
        gen = [dec.generate(p, GREEDY, stop=[eos]) for p in prompts]
        same = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), min(len(g), len(r)))
                for g, r in zip(gen, ref_gen)]
        rows[name] = {"bytes": path.stat().st_size, "weight_bytes": weight_bytes(path), "ppl": ppl,
                      "top1": gm["next_token_top1"], "top1_all": gm["next_token_top1_all"], "kl": gm["kl_divergence"],
                      "greedy": same, "settings": settings,
                      "greedy_len": [len(r) for r in ref_gen]}

        prefill, decode = decoder_calls(dec, [int(t) for t in prompt[0]], args.steps)
        fns[f"{name} prefill"], fns[f"{name} decode"] = prefill, decode
        decode()
        rows[name]["runtime_mb"] = round(rss_mb() - before, 1)
        print(f"{name}: ppl {ppl:.3f} top1 {rows[name]['top1']} kl {gm['kl_divergence']:.3g} greedy {same}",
              file=sys.stderr, flush=True)

    print("peak memory of fresh processes", file=sys.stderr, flush=True)
    ids = [int(t) for t in prompt[0]]
    rows["pytorch eager fp32"]["peak_mb"] = fresh_peak_mb("torch", folder, args.threads, ids, args.steps)
    for name, (path, _settings) in built.items():
        rows[name]["peak_mb"] = fresh_peak_mb("ort", path, args.threads, ids, args.steps)

    bw = [copy_bandwidth()]
    timing = bench.interleaved(fns, warmup=2, runs=args.runs, rounds=args.rounds,
                               log=lambda m: print(m, file=sys.stderr, flush=True))
    bw.append(copy_bandwidth())
    t_pre, t_dec = timing["pytorch eager fp32 prefill"], timing["pytorch eager fp32 decode"]
    for name, row in rows.items():
        key = "pytorch eager fp32" if name.startswith("pytorch") else name
        pre, dec = timing[f"{key} prefill"], timing[f"{key} decode"]
        row.update(ttft_ms=pre["p50_ms"], prefill_tps=PROMPT / pre["p50_ms"] * 1e3,
                   decode_tps=args.steps / dec["p50_ms"] * 1e3, prefill_speedup=bench.speedup(t_pre, pre),
                   decode_speedup=bench.speedup(t_dec, dec), noisy=[n for n in (pre.get("noisy"), dec.get("noisy")) if n])
        row["gbps"] = row["weight_bytes"] * row["decode_tps"] / 1e9
    gen_ms = timing["pytorch generate() fp32 e2e"]["p50_ms"]
    result = {"machine": bench.machine(), "versions": bench.runtime_versions(), "threads": args.threads,
              "rounds": args.rounds, "steps": args.steps, "prompt_tokens": PROMPT, "copy_bandwidth_gbps": bw,
              "decoder": {k: info[k] for k in ("parameters", "held_out_perplexity", "train_seconds")},
              "teacher_forced_tokens": base["positions"], "decisive_positions": base["decisive_positions"],
              "generate_e2e_ms": gen_ms, "rows": rows,
              "goal": goal(rows)}
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / "decoder.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "decoder.md").write_text(render(result))
    print(render(result))
    return 0


def goal(rows: dict) -> dict:
    r = rows.get("ort int4 weight-only")
    if not r:
        return {"met": False, "why": "no int4 row"}
    sp = r["decode_speedup"]
    by_round = sp.get("speedup_by_round") or [sp["speedup"]]
    ppl_change = r["ppl"] / rows["pytorch eager fp32"]["ppl"] - 1
    return {"decode_speedup_min_round": min(by_round), "ppl_change": ppl_change,
            "met": min(by_round) >= GOAL_SPEEDUP and abs(ppl_change) <= GOAL_PPL}


def render(r: dict) -> str:
    from edgeexport.bench import format_speedup

    m = r["machine"]
    lines = [
        "# Decoder with a KV cache: PyTorch eager vs onnxruntime precisions (batch 1)", "",
        f"Machine: {m.get('cpu', m.get('machine'))}, {m.get('cpu_count')} cores, {r['threads']} threads for every "
        f"side. Memory copy bandwidth (numpy, read + write): {r['copy_bandwidth_gbps'][0]:.1f} / "
        f"{r['copy_bandwidth_gbps'][1]:.1f} GB/s before/after. Versions: "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items()), "",
        f"Model: GPT-2 style, {r['decoder']['parameters'] / 1e6:.2f} M parameters, trained in "
        f"{r['decoder']['train_seconds']:.0f} s on pydoc_data.topics (edgeexport.models.decoder). Accuracy on "
        f"{r['teacher_forced_tokens']:,} held-out token positions (teacher-forced; {r['decisive_positions']:,} "
        "decisive: PyTorch's top token leads the runner-up by >= 0.02 in probability, as the build's gate counts) "
        "and 4 greedy continuations of up to "
        f"{GREEDY} tokens; timing: prefill of {r['prompt_tokens']} tokens (= time to first token), {r['steps']} "
        f"decode steps from the same cache, {r['rounds']} interleaved rounds. 'greedy' is how many tokens each "
        "continuation matches PyTorch's before the first difference (of the lengths in the first row). 'peak MB' "
        "is the peak resident memory of a fresh process that imports its runtime, loads that variant and runs the "
        "prefill and the decode steps once (median of 3 processes; PyTorch's imports torch and transformers, without "
        "TensorFlow or JAX; the others onnxruntime and numpy). 'session MB' is what this process grew by while loading and running that "
        "variant (PyTorch's: its model was loaded first).", "",
        "| variant | size MB | peak MB (fresh process) | session MB | TTFT ms | prefill tok/s | decode tok/s | decode vs eager | prefill vs eager | "
        "perplexity | ppl change | KL nats/token | top-1 agree, decisive | top-1 agree, all | greedy | "
        "weight GB/s at decode |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = r["rows"]["pytorch eager fp32"]["ppl"]
    for name, row in r["rows"].items():
        greedy = "/".join(map(str, row["greedy"]))
        lines.append(
            f"| {name} | {row['bytes'] / 1e6:.2f} | {row.get('peak_mb', float('nan')):.0f} | {row.get('runtime_mb', '-')} | {row['ttft_ms']:.2f} | {row['prefill_tps']:,.0f} | "
            f"{row['decode_tps']:,.0f} | {format_speedup(row['decode_speedup'])} | "
            f"{format_speedup(row['prefill_speedup'])} | {row['ppl']:.3f} | {100 * (row['ppl'] / base - 1):+.2f}% | "
            f"{row['kl']:.3g} | {row['top1']:.4f} | {row['top1_all']:.4f} | {greedy} | {row['gbps']:.2f} |")
    lines += ["", f"transformers' generate() (prompt + {r['steps']} tokens, KV cache): "
              f"{r['generate_e2e_ms']:.1f} ms end to end, {r['steps'] / r['generate_e2e_ms'] * 1e3:,.0f} tok/s "
              "including the prefill.", ""]
    for name, row in r["rows"].items():
        if row.get("noisy"):
            lines.append(f"- {name}: timing noisy ({'; '.join(row['noisy'])})")
    g = r["goal"]
    if "ppl_change" in g:
        lines += ["", f"Goal (issue 21): int4 weight-only decode >= {GOAL_SPEEDUP:.0f}x eager in every round and "
                  f"perplexity within {GOAL_PPL:.0%}: slowest round {g['decode_speedup_min_round']:.2f}x, "
                  f"perplexity {100 * g['ppl_change']:+.2f}%: {'MET' if g['met'] else 'NOT MET'}."]
    for name, row in r["rows"].items():
        if row.get("settings", {}).get("quantization") == "weight-only":
            s = row["settings"]
            widths = ", ".join(f"{n} at {b} bits" for b, n in s["matmuls_by_bits"].items())
            lines.append(f"- {name}: {s['quantized_matmuls']} MatMulNBits ({widths}; output layer "
                         f"{', '.join(s['output_layers'])}), block {s['block_size']}, accuracy_level "
                         f"{s['accuracy_level']}; token embeddings {s['embeddings']}; {s['float_weight_matmuls']} "
                         "weight MatMuls left float")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
