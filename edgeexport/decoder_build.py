"""``--task text-generation``: a Hugging Face causal LM (``hf:DIR``) built into a decoder bundle with its KV cache.

Export (optimum's text-generation-with-past graph: one graph for prefill and decode), the ORT target's precision
(fp32, fp16, weight-only int8/int4 as MatMulNBits, int8-dynamic), validation for generation against the PyTorch
model on held-out text (teacher-forced next-token top-1 agreement and the relative change of perplexity, both
gated; greedy continuations compared token by token, reported), then the bundle: the model, the tokenizer, golden
greedy continuations, and a loader whose ``generate()`` keeps the cache in numpy. See docs/decoders.md.

A decoder needs no calibration at these precisions: the --calib text (or --val, where given) is held-out text for
validation only, and must be text the model was not trained on for the perplexity to mean anything.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeexport.config import DECODER_TOLERANCES, BuildConfig
from edgeexport.generation import DECISIVE_GAP
from edgeexport.errors import CalibrationError, ConfigError, ModelLoadError, TargetError, ValidationFailed
from edgeexport.util import heartbeat, remove_stale, tmp_prefix

TASK = "text-generation"
WINDOW = 128          # tokens per teacher-forced window (or the context, if shorter)
DEFAULT_WINDOWS = 32  # held-out windows by default (4,096 tokens)
GREEDY_TOKENS = 32    # greedy tokens per prompt compared with PyTorch
GOLDEN_TOKENS = 16    # golden continuation length the loader's self-test replays
PROMPT_WORDS = 6
#: the self-test's near-tie margin per precision: a golden token within this of the top logit may flip on another
#: CPU (fp32 sums in another order; int8 activation blocks round differently) without the bundle being wrong
LOGIT_MARGIN = {"fp32": 0.01, "fp16": 0.05, "int8-weight": 0.1, "int4-weight": 0.2, "int8-dynamic": 0.2}
Log = Callable[[str], None]


def is_decoder_task(task: str | None) -> bool:
    return task in (TASK, "text-generation-with-past")


def check(config: BuildConfig) -> None:
    """Everything that can be refused before any work: target, precision, model spec, options."""
    from edgeexport.targets import all_targets, get_target

    target = get_target(config.target)
    if not target.decoder_precisions:
        able = [f"--target {t.name} ({', '.join(t.decoder_precisions)})" for t in all_targets()
                if t.decoder_precisions and t.public]
        raise TargetError(f"--task {TASK} is not supported for --target {config.target}", target.decoder_refusal,
                          f"build the decoder with {' or '.join(able)}")
    if config.precision not in target.decoder_precisions:
        raise ConfigError(f"--precision {config.precision} is not offered for decoders"
                          + (" (int8 is the build's default precision)" if config.precision == "int8" else ""),
                          "static int8 would need calibrated ranges for every attention score and cache tensor; "
                          "weight-only quantization is what decode speed depends on (it reads every weight per token)",
                          f"pass --precision int4-weight (smallest, fastest to decode), or one of "
                          f"{', '.join(p for p in target.decoder_precisions if p != 'int4-weight')}"
                          if "int4-weight" in target.decoder_precisions else
                          f"pass one of {', '.join(target.decoder_precisions)}")
    if not config.model.startswith("hf:"):
        raise ConfigError(f"--task {TASK} needs a Hugging Face causal LM folder, not {config.model!r}",
                          "the KV-cache export path is optimum's text-generation-with-past",
                          "save the model and its tokenizer with save_pretrained() and pass --model hf:DIR")
    for flag, given in (("--accuracy-budget", config.accuracy_budget), ("--prune", config.prune),
                        ("--explain", config.explain), ("--state", config.state), ("--output", config.outputs),
                        ("--input", config.inputs)):
        if given:
            raise ConfigError(f"{flag} does not apply to --task {TASK}",
                              "a decoder's inputs, outputs and cache come from the export",
                              f"drop {flag}")
    unknown = [k for k in config.tolerance if k not in DECODER_TOLERANCES["fp32"]]
    if unknown:
        raise ConfigError(f"--tolerance {', '.join(unknown)} does not apply to decoders",
                          f"decoders are judged on {', '.join(DECODER_TOLERANCES['fp32'])}",
                          "use --tolerance next_token_top1=0.9 or --tolerance perplexity_change=0.05")
    from edgeexport.targets.base import refuse

    refuse(target.check(config), f"target {config.target!r} cannot build this configuration",
           "change the settings named above")


class Decoder:
    """The model folder, its config and tokenizer, checked against each other."""

    def __init__(self, spec: str) -> None:
        self.folder = Path(spec[len("hf:"):])
        cfg_file = self.folder / "config.json"
        if not cfg_file.is_file():
            raise ModelLoadError(f"{str(self.folder)!r} is not a Hugging Face model directory (no config.json)", "",
                                 "point hf: at a folder saved with save_pretrained()")
        try:
            self.config = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read {str(cfg_file)!r}", str(e)[:200], "re-save the model") from None
        arch = [a for a in self.config.get("architectures") or [] if isinstance(a, str)]
        if arch and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in arch):
            raise ModelLoadError(f"{str(self.folder)!r} holds a {', '.join(arch)}, not a causal language model",
                                 "text generation needs a next-token head (an ...ForCausalLM or ...LMHeadModel)",
                                 "save the causal LM (e.g. AutoModelForCausalLM) with save_pretrained(), or drop "
                                 "--task text-generation for an encoder")
        if not (self.folder / "tokenizer.json").is_file():
            raise ModelLoadError(f"{str(self.folder)!r} has no tokenizer.json",
                                 "the bundle's loader tokenizes prompts with the tokenizers package",
                                 "save a fast tokenizer beside the model (tokenizer.save_pretrained(DIR))")
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        except Exception as e:
            raise ModelLoadError("cannot load tokenizer.json", str(e)[:200], "re-save the tokenizer") from None
        vocab = self.config.get("vocab_size")
        size = self.tokenizer.get_vocab_size()
        if isinstance(vocab, int) and size > vocab:
            raise ConfigError(f"the tokenizer has {size:,} tokens but the model's vocabulary has {vocab:,}",
                              "ids past the model's embedding table cannot be looked up: they do not belong together",
                              "save the tokenizer the model was trained with into the folder")
        self.context = next((int(self.config[k]) for k in ("n_positions", "max_position_embeddings", "n_ctx")
                             if isinstance(self.config.get(k), int)), None)
        eos = self.config.get("eos_token_id")
        self.eos = [eos] if isinstance(eos, int) else [e for e in eos or [] if isinstance(e, int)]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids


def text_file(config: BuildConfig) -> Path:
    """The held-out text file (--val, else --calib), checked before any model is loaded."""
    path = config.calibration.validation_path or config.calibration.path
    if not path:
        raise CalibrationError(f"--task {TASK} needs held-out text", "perplexity and next-token agreement are "
                               "measured on text, and none was given",
                               "pass --calib TEXT.txt (prose the model was not trained on, one paragraph per line)")
    p = Path(path)
    if not p.is_file() or p.suffix.lower() not in (".txt", ".md"):
        raise CalibrationError(f"{path!r} is not a text file", "decoders are validated on plain text (.txt, .md)",
                               "pass --calib TEXT.txt")
    return p


def held_out(config: BuildConfig, dec: Decoder, p: Path) -> tuple[list[list[int]], list[list[int]], dict[str, Any]]:
    """Token windows and greedy prompts from the held-out text, and the record of where they came from."""
    from edgeexport.generation import windows

    path = str(p)
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"cannot read {path!r} as UTF-8 text", str(e)[:200], "pass a UTF-8 text file") from None
    eos = dec.eos[:1]
    ids = [t for ln in lines for t in dec.encode(ln) + eos]
    size = min(WINDOW, dec.context or WINDOW)
    count = config.calibration.holdout or DEFAULT_WINDOWS
    wins = windows(ids, size)[:count]
    need = config.calibration.min_holdout
    if len(wins) < need:
        raise CalibrationError(f"{path!r} gives {len(wins)} windows of {size} tokens; validation needs at least {need}",
                               f"{len(ids):,} tokens in {len(lines)} lines",
                               "give more held-out text, or lower --min-holdout knowingly")
    prompts = []
    for ln in lines:
        words = ln.split()
        if len(words) >= 2 * PROMPT_WORDS:
            pid = dec.encode(" ".join(words[:PROMPT_WORDS]))
            if pid and pid not in prompts:
                prompts.append(pid)
        if len(prompts) == max(1, config.golden_samples):
            break
    if not prompts:
        raise CalibrationError(f"{path!r} has no line of {2 * PROMPT_WORDS} words or more to prompt with",
                               "greedy continuations start from the first words of held-out lines",
                               "give prose, one paragraph per line")
    record = {"source": str(path), "kind": "text", "windows": len(wins), "window_tokens": size,
              "tokens": int(sum(len(w) for w in wins)), "prompts": len(prompts),
              "used_for": "validation only (the decoder precisions need no calibration)"}
    return wins, prompts, record


def build(config: BuildConfig, log: Log, exported: Path | None = None) -> tuple[Path, dict[str, Any], Any]:
    """The decoder build; returns the bundle's path, its manifest and the validation report (pipeline.build wraps
    them in a BuildResult). Raises ValidationFailed when out of tolerance. ``exported``: the model's
    text-generation-with-past graph when already exported (compare exports once for every row); it is copied,
    never changed."""
    from edgeexport.bundle.writer import check_archive_path, check_output_path

    check(config)
    check_output_path(Path(config.out), config.force)
    check_archive_path(Path(config.out), config.archive, config.force)
    text = text_file(config)
    log(f"==> loading decoder {config.model}")
    dec = Decoder(config.model)
    wins, prompts, data = held_out(config, dec, text)
    log(f"    data: {data['windows']} held-out windows of {data['window_tokens']} tokens ({data['tokens']:,} tokens) "
        f"and {data['prompts']} prompts from {data['source']}")
    remove_stale(Path(tempfile.gettempdir()), ("edgeexport-",))
    with tempfile.TemporaryDirectory(prefix=tmp_prefix()) as tmp:
        work = Path(tmp)
        graph = work / "exported.onnx"
        if exported is not None:
            import shutil

            shutil.copyfile(exported, graph)
        else:
            log(f"==> exporting with optimum (text-generation-with-past, opset {config.opset})")
            from edgeexport.source_hf import export_with_past

            with heartbeat(log, "exporting"):
                export_with_past(dec.folder, graph, config.opset)
        log(f"==> building {config.target} / {config.precision}")
        from edgeexport.targets import get_target

        artifact = get_target(config.target).build_decoder(config, work, graph)
        for note in artifact.notes:
            log(f"    note: {note}")
        log(f"==> validating on {data['windows']} held-out windows and {len(prompts)} greedy continuations")
        with heartbeat(log, "validating"):
            report, metrics, cand = validate(config, dec, artifact, wins, prompts)
        log(_table(metrics, report))
        if not report.passed:
            raise ValidationFailed(
                f"validation failed: {config.target}/{config.precision} is out of tolerance on {metrics['positions']:,} held-out "
                "tokens; "
                "no bundle was written",
                "; ".join(f"{c.metric}={c.value:.4g} (limit {c.limit:g})" for c in report.failures()),
                "try a more precise weight-only setting (--option block_size=16, or int8-weight), or relax the limit "
                "knowingly with --tolerance next_token_top1=... / perplexity_change=...", report=report)
        out, manifest = _package(config, dec, artifact, report, metrics, data, cand, prompts, log)
    if config.archive:
        from edgeexport.bundle.writer import write_archive

        log(f"==> packing {write_archive(out, config.archive)}")
    return out, manifest, report


def validate(config: BuildConfig, dec: Decoder, artifact: Any, wins: list[list[int]],
             prompts: list[list[int]]) -> tuple[Any, dict[str, Any], Any]:
    """Teacher-forced next-token agreement and perplexity of both models, and greedy continuations."""
    import torch

    from edgeexport.bench import resolve_threads, set_torch_threads
    from edgeexport.generation import KVDecoder, generation_metrics, position_stats
    from edgeexport.reference import OnnxRunner
    from edgeexport.util import quiet
    from edgeexport.validate import Check, ValidationReport

    threads = resolve_threads(config.bench.threads)
    with quiet():
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(str(dec.folder)).eval()
        except Exception as e:
            raise ModelLoadError("transformers cannot load the decoder", str(e)[:300], "check the folder") from None
    set_torch_threads(threads)
    cand = KVDecoder(OnnxRunner(str(artifact.model_path), threads=threads).session, context=dec.context)
    stats = []
    with torch.inference_mode():
        for w in wins:
            ref = model(input_ids=torch.tensor([w])).logits[0].float().numpy()
            built, _ = cand.step(np.asarray([w]), cand.empty())
            stats.append(position_stats(ref, built[0], w))
        greedy = []
        for p in prompts:
            with quiet():
                out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                     max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                     pad_token_id=dec.eos[0] if dec.eos else 0)[0, len(p):].tolist()
            want = next((out[:i] for i, t in enumerate(out) if t in dec.eos), out)
            got = cand.generate(p, GREEDY_TOKENS, stop=dec.eos)
            same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            greedy.append({"prompt": dec.tokenizer.decode(p), "reference_tokens": len(want), "built_tokens": len(got),
                           "matching_prefix": same})
    metrics: dict[str, Any] = dict(generation_metrics(stats), greedy=greedy, decisive_gap=DECISIVE_GAP,
                                   reference="PyTorch eager (transformers), teacher-forced; greedy continuations "
                                             "by generate()")
    limits = dict(DECODER_TOLERANCES[config.precision], **config.tolerance)
    checks = [Check("logits", "kl_divergence", metrics["kl_divergence"], limits["kl_divergence"], "max"),
              Check("logits", "perplexity_change", metrics["perplexity_change"], limits["perplexity_change"], "max")]
    if metrics["next_token_top1"] is not None:
        checks.insert(0, Check("logits", "next_token_top1", metrics["next_token_top1"], limits["next_token_top1"],
                               "min"))
    report = ValidationReport(outputs={"logits": {"kind": "next-token logits", **{
        k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}}},
        tolerance=limits, checks=checks, samples=len(wins))
    return report, metrics, cand


def _table(m: dict[str, Any], report: Any) -> str:
    t = report.tolerance
    top1 = (f"{m['next_token_top1']:.4f} on the {m['decisive_positions']:,} decisive positions (limit >= "
            f"{t['next_token_top1']:g})" if m["next_token_top1"] is not None else
            f"not checked: only {m['decisive_positions']} positions are decisive (the reference's next-token "
            "distribution is nearly flat on this text)")
    lines = [f"    next-token top-1 agreement {top1}; {m['next_token_top1_all']:.4f} over all {m['positions']:,}",
             f"    KL divergence {m['kl_divergence']:.3g} nats/token (limit <= {t['kl_divergence']:g}); perplexity "
             f"{m['perplexity']:.3f} vs PyTorch {m['perplexity_reference']:.3f} ({100 * m['perplexity_change']:+.2f}%, "
             f"limit {100 * t['perplexity_change']:+.2f}%)"]
    for g in m["greedy"]:
        lines.append(f"    greedy {g['prompt']!r}: {g['matching_prefix']} of {g['reference_tokens']} tokens as PyTorch")
    return "\n".join(lines)


def _package(config: BuildConfig, dec: Decoder, artifact: Any, report: Any, metrics: dict[str, Any],
             data: dict[str, Any], cand: Any, prompts: list[list[int]], log: Log) -> Any:
    from edgeexport.bundle.loader import TOKENIZER_FILE
    from edgeexport.bundle.manifest import golden_tolerance, now_iso, versions
    from edgeexport.bundle.writer import write_bundle
    from edgeexport.runner import ort_io
    from edgeexport.source_hf import tokenizer_files
    from edgeexport.targets import get_target

    target = get_target(config.target)
    session = cand.session
    # a golden prefill (the generic self-test replays it) and golden greedy continuations (replayed by generate)
    lay = cand.layout
    p0 = np.asarray([prompts[0]], dtype=np.int64)
    feed = {"input_ids": p0, "attention_mask": np.ones_like(p0)}
    if lay.position_ids:
        feed["position_ids"] = np.arange(p0.shape[1], dtype=np.int64)[None]
    feed.update(zip(lay.past, cand.empty()))
    names = [o.name for o in session.get_outputs()]
    golden_pair = (feed, dict(zip(names, session.run(None, feed))))
    continuations = [{"prompt_ids": p, "continuation_ids": cand.generate(p, GOLDEN_TOKENS)} for p in prompts]
    # as the session declares them; named dims without spaces ('past_sequence_length+sequence_length')
    io = {k: [dict(t.to_dict(), shape=[d if isinstance(d, int) else str(d).replace(" ", "") for d in t.shape])
              for t in ts] for k, ts in zip(("inputs", "outputs"), ort_io(session))}
    files = {name: artifact.root / name for name in artifact.files}
    files.update(tokenizer_files(dec.folder))
    settings = dict(artifact.settings)
    manifest = {
        "schema_version": 1, "created": now_iso(), "target": config.target, "precision": config.precision,
        "precision_label": target.precision_label(config.precision), "model_file": artifact.files[0],
        "model_files": artifact.model_files, "inputs": io["inputs"], "outputs": io["outputs"],
        "runtime": artifact.runtime, "runtime_config": artifact.runtime_config, "versions": versions(),
        "source": {"spec": config.model, "kind": "hf", "task": TASK, "library": "transformers"},
        "export": {"opset": config.opset, "exporter": "optimum (text-generation-with-past)"},
        "quantization": settings, "calibration": data, "preprocess": None,
        "text": {"tokenizer": TOKENIZER_FILE, "max_length": dec.context or 0, "padding": None, "truncation": False},
        "task": TASK,
        "validation": dict(report.to_dict(), runtime=f"onnxruntime {artifact.runtime.get('onnxruntime', '')}",
                           generation=metrics),
        "benchmark": {"skipped": "decoders are timed per token (time to first token, prefill and decode tokens/s) "
                                 "by edgeexport bench and edgeexport compare"},
        "golden": {"count": 1, "tolerance": golden_tolerance(config.precision, [golden_pair[1]]),
                   "produced_by": "the built model: one prefill of the first prompt"},
        "generation": {"context": dec.context, "stop_ids": dec.eos, "golden": continuations,
                       "golden_logit_margin": LOGIT_MARGIN[config.precision], "window_tokens": data["window_tokens"]},
        "config": config.model_dump(mode="json"), "state": None, "notes": list(artifact.notes),
    }
    requirements = target.requirements(artifact) + ["tokenizers"]
    texts = {"requirements.txt": "\n".join(requirements) + "\n", "report.md": render(manifest)}
    log(f"==> writing bundle to {config.out}")
    out = write_bundle(Path(config.out), files, [golden_pair], manifest, texts, config.force, target.loader_backend())
    return out, manifest


def render(m: dict[str, Any]) -> str:
    """report.md of a decoder bundle."""
    g = m["validation"]["generation"]
    q = m["quantization"]
    tol = m["validation"]["tolerance"]
    lines = [f"# {m['source']['spec']} -> {m['target']} / {m['precision']}", "", f"Precision: {m['precision_label']}", "",
             "## Validation (generation)", "",
             f"On {g['positions']:,} held-out token positions from {m['calibration']['source']} (teacher-forced, "
             "against PyTorch eager):", "",
             "| metric | value | limit |", "|---|---|---|",
             f"| next-token top-1 agreement, decisive positions ({g['decisive_positions']:,}) | "
             + (f"{g['next_token_top1']:.4f} | >= {tol['next_token_top1']:g} |" if g["next_token_top1"] is not None
                else "not checked (too few decisive positions) | |"),
             f"| next-token top-1 agreement, all positions | {g['next_token_top1_all']:.4f} | |",
             f"| KL divergence, nats per token | {g['kl_divergence']:.3g} | <= {tol['kl_divergence']:g} |",
             f"| perplexity (built / PyTorch) | {g['perplexity']:.3f} / {g['perplexity_reference']:.3f} | |",
             f"| perplexity change | {100 * g['perplexity_change']:+.2f}% | <= {100 * tol['perplexity_change']:+.2f}% |",
             "", f"A position is decisive when PyTorch's top token leads its runner-up by >= {g['decisive_gap']:g} in "
             "probability.", "",
             "Greedy continuations (tokens matching PyTorch's before the first difference):", ""]
    lines += [f"- {x['prompt']!r}: {x['matching_prefix']} of {x['reference_tokens']}" for x in g["greedy"]]
    if q.get("quantization") == "weight-only":
        widths = ", ".join(f"{n} at {b} bits" for b, n in q["matmuls_by_bits"].items())
        lines += ["", f"Weight-only: {q['quantized_matmuls']} MatMulNBits ({widths}; block {q['block_size']}; output "
                  f"layers {', '.join(q['output_layers']) or 'none'}), token embeddings {q['embeddings']}, "
                  f"{q['float_weight_matmuls']} weight MatMuls left float; activations: {q['activations']}."]
    lines += ["", f"Context: {m['generation']['context']} positions. Run: `python loader.py --selftest`; in code: "
              "`load(BUNDLE).generate(\"prompt\", max_new_tokens=32)`."]
    return "\n".join(lines) + "\n"

