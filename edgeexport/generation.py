"""Generation metrics for decoders with a KV cache: the build side of --task text-generation and the decoder
benchmark. The runtime half (``KVDecoder``: prefill and decode steps over onnxruntime with the cache in numpy,
``pick`` for greedy or top-k sampling) lives in the loader core, edgeexport/bundle/loader.py, because it ships in
every decoder bundle; it is re-exported here.

The graph is the one optimum exports for ``text-generation-with-past``: inputs ``input_ids`` [batch, sequence],
``attention_mask`` [batch, past + sequence], optionally ``position_ids`` [batch, sequence], and for each layer
``past_key_values.N.key`` / ``.value`` [batch, heads, past, head_dim]; outputs ``logits`` [batch, sequence,
vocab] and ``present.N.key`` / ``.value`` [batch, heads, past + sequence, head_dim].
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edgeexport.bundle.loader import InputError as DecoderError, KVDecoder, decoder_layout, pick  # noqa: F401


def windows(ids: Sequence[int], size: int) -> list[list[int]]:
    """``ids`` cut into consecutive windows of ``size`` tokens (the last one shorter, dropped under 2 tokens)."""
    out = [list(ids[s:s + size]) for s in range(0, len(ids), size)]
    return [w for w in out if len(w) >= 2]


#: a position's reference choice is decisive when its top token leads the runner-up by this much probability;
#: below it, rounding may flip the choice without either model being wrong (the trained decoder with every weight
#: at 4 bits agreed with PyTorch at 0.908 of all positions and at 0.975 of the decisive ones)
DECISIVE_GAP = 0.02
#: the fewest decisive positions for the top-1 agreement to be checked at all (a near-uniform model has none)
MIN_DECISIVE = 50


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    lg = logits.astype(np.float64)
    lg = lg - lg.max(axis=-1, keepdims=True)
    return lg - np.log(np.exp(lg).sum(axis=-1, keepdims=True))


def position_stats(ref_logits: np.ndarray, built_logits: np.ndarray, ids: Sequence[int]) -> dict[str, np.ndarray]:
    """Per predicted position of one window (logits [n, vocab] over tokens ``ids``, positions 0..n-2): whether the
    top-1 tokens agree, the reference's lead of its top token over the runner-up (probability), the KL divergence
    KL(reference || built) in nats, and each model's negative log-likelihood of the token that follows."""
    ref, built = _log_softmax(ref_logits[:-1]), _log_softmax(built_logits[:-1])
    nxt = np.asarray(ids)[1:]
    rows = np.arange(len(nxt))
    p = np.exp(ref)
    two = np.partition(p, -2, axis=-1)[:, -2:]
    return {"agree": ref.argmax(-1) == built.argmax(-1), "gap": two[:, 1] - two[:, 0],
            "kl": (p * (ref - built)).sum(-1), "nll_ref": -ref[rows, nxt], "nll": -built[rows, nxt]}


def generation_metrics(stats: list[dict[str, np.ndarray]]) -> dict[str, float | int | None]:
    """The validation metrics over every window's ``position_stats``."""
    cat = {k: np.concatenate([s[k] for s in stats]) for k in stats[0]}
    decisive = cat["gap"] >= DECISIVE_GAP
    ppl_ref, ppl = float(np.exp(cat["nll_ref"].mean())), float(np.exp(cat["nll"].mean()))
    return {"next_token_top1": float(cat["agree"][decisive].mean()) if decisive.sum() >= MIN_DECISIVE else None,
            "next_token_top1_all": float(cat["agree"].mean()), "decisive_positions": int(decisive.sum()),
            "positions": int(cat["agree"].size), "kl_divergence": float(cat["kl"].mean()),
            "perplexity_reference": ppl_ref, "perplexity": ppl, "perplexity_change": ppl / ppl_ref - 1}
