"""A small GPT-style decoder trained here, in code, on real English: the standard library's ``pydoc_data.topics``
(the Python reference's prose, about 465,000 characters). No download: a byte-level BPE tokenizer is trained by
``tokenizers``, then a ``transformers`` ``GPT2LMHeadModel`` of about 2 M parameters, in a couple of minutes on
two cores. It is saved with ``save_pretrained`` (model and tokenizer), so ``--model hf:DIR`` builds it like any
Hugging Face decoder.

The text is split by paragraph: every tenth distinct paragraph is held out (``held_out_text``, about 45,000 characters)
and never trained on, so perplexity and next-token agreement are measured on text the model has not seen.

The trained folder is cached (``decoder_path``): under ``$EDGEEXPORT_CACHE``, else the repository's ``build/cache``
when run from a checkout, else ``~/.cache/edgeexport``. The folder's name carries a hash of the recipe below, so a
changed recipe trains again; a folder is written whole or not at all.

    python -m edgeexport.models.decoder [--held-out held.txt]   # trains (or finds) it and prints the folder
    edgeexport build --model hf:$(python -m edgeexport.models.decoder) --task text-generation ...
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

#: the recipe; any change trains a new model (its hash names the cache folder)
RECIPE: dict[str, Any] = {
    "version": 3, "vocab_size": 2048, "n_positions": 256, "n_embd": 192, "n_layer": 4, "n_head": 4,
    "block": 128, "batch": 16, "steps": 500, "lr": 3e-3, "warmup": 30, "seed": 0, "held_out_every": 10,
}
EOS = "<|endoftext|>"


def _paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    paras = (p.strip("\n") for k in sorted(topics) for p in re.split(r"\n\s*\n", topics[k]) if p.strip())
    return list(dict.fromkeys(paras))  # once each: a paragraph repeated in two topics must not straddle the split


def training_text() -> list[str]:
    """The paragraphs the decoder is trained on (all but every ``held_out_every``-th), in document order."""
    every = RECIPE["held_out_every"]
    return [t for i, t in enumerate(_paragraphs()) if i % every != every - 1]


def held_out_text() -> list[str]:
    """The paragraphs it never saw: every ``held_out_every``-th, in document order."""
    every = RECIPE["held_out_every"]
    return [t for i, t in enumerate(_paragraphs()) if i % every == every - 1]


def prompts(count: int = 4, words: int = 6) -> list[str]:
    """Short prompts cut from the held-out topics (their first sentence's first words)."""
    out = []
    for text in held_out_text():
        first = " ".join(text.split()[:words])
        if len(text.split()) > 2 * words and first[:1].isupper() and first not in out:
            out.append(first)
        if len(out) == count:
            break
    return out


def _cache_root() -> Path:
    if os.environ.get("EDGEEXPORT_CACHE"):
        return Path(os.environ["EDGEEXPORT_CACHE"])
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file() and (repo / "edgeexport").is_dir():
        return repo / "build" / "cache"
    return Path.home() / ".cache" / "edgeexport"


def decoder_path(progress: Callable[[str], None] | None = None) -> str:
    """The trained decoder's folder (trained on first use, then cached)."""
    key = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]
    folder = _cache_root() / f"pydoc-gpt2-{key}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        train(tmp, progress)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first: keep theirs
            if not (folder / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def _tokenizer(texts: list[str]):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=RECIPE["vocab_size"], special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def train(out: Path, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the tokenizer and the decoder into ``out``; returns the held-out perplexity and the time taken."""
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    say = progress or (lambda s: None)
    r = RECIPE
    start = time.perf_counter()
    texts = training_text()
    tok = _tokenizer(texts)
    eos = tok.token_to_id(EOS)
    ids = np.concatenate([np.array(tok.encode(t).ids + [eos], dtype=np.int64) for t in texts])
    held = np.concatenate([np.array(tok.encode(t).ids + [eos], dtype=np.int64) for t in held_out_text()])
    say(f"decoder: tokenizer {r['vocab_size']} tokens; {len(ids):,} training / {len(held):,} held-out tokens")

    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(r["seed"])
    rng = np.random.default_rng(r["seed"])
    config = GPT2Config(vocab_size=r["vocab_size"], n_positions=r["n_positions"], n_embd=r["n_embd"],
                        n_layer=r["n_layer"], n_head=r["n_head"], bos_token_id=eos, eos_token_id=eos,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / r["warmup"]) * 0.5 * (1 + np.cos(np.pi * min(s, r["steps"]) / r["steps"])))
    block = r["block"]
    try:
        model.train()
        for step in range(r["steps"]):
            starts = rng.integers(0, len(ids) - block - 1, r["batch"])
            x = torch.from_numpy(np.stack([ids[s:s + block] for s in starts]))
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 100 == 0 or step == r["steps"] - 1:
                say(f"decoder: step {step + 1}/{r['steps']} loss {loss.item():.3f}")
        model.eval()
        ppl = perplexity(model, held, block)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                   model_max_length=r["n_positions"])
    fast.save_pretrained(out)
    info = {"held_out_perplexity": round(float(ppl), 3), "train_seconds": round(time.perf_counter() - start, 1),
            "parameters": sum(p.numel() for p in model.parameters()), "recipe": r}
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    say(f"decoder: held-out perplexity {ppl:.2f}, trained in {info['train_seconds']:.0f} s")
    return info


def perplexity(model, ids, block: int) -> float:  # type: ignore[no-untyped-def]
    """Teacher-forced perplexity of ``model`` over ``ids`` in non-overlapping windows of ``block`` tokens."""
    import numpy as np
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(ids) - 1, block):
            x = torch.from_numpy(np.asarray(ids[s:s + block + 1])[None])
            if x.shape[1] < 2:
                break
            logits = model(input_ids=x[:, :-1]).logits
            nll = torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum")
            total, count = total + float(nll), count + x.shape[1] - 1
    return float(np.exp(total / count))


def write_held_out(path: str | Path) -> Path:
    """The held-out paragraphs, one per line (what --calib takes for --task text-generation)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(" ".join(t.split()) for t in held_out_text()) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="train (or find) the decoder and print its folder")
    parser.add_argument("--held-out", help="also write the held-out paragraphs, one per line, to this file")
    args = parser.parse_args()
    if args.held_out:
        print(f"wrote {write_held_out(args.held_out)}", file=sys.stderr)
    print(decoder_path(progress=lambda s: print(s, flush=True, file=sys.stderr)))
