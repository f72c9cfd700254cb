"""Stateful (streaming) models: an output fed back as an input on the next call (a recurrent state).

A voice detector or a streaming encoder runs chunk after chunk on the device, each call taking the state the
previous one returned. Validating it with the float model's state at every step hides how the built model's own
state drifts, so a stateful build is validated the way the device runs it:

- state pairs come from ``--state IN=OUT`` or are detected (:func:`detect_pairs`: an output named like an input,
  ``state`` -> ``stateN``, ``h0`` -> ``hn``, with the same shape on the data);
- the data's samples are chunks in time order. Streams start where the data's ``stream_start`` array (a flag per
  sample) says; without it, at the first sample and at every sample whose stored state is all zeros (the initial
  state), unless every stored state is zero, which makes the data one stream;
- the state inputs of every sample are replaced by the state the float reference carries into it, streamed from
  those starts (:func:`carry_reference_state`), so calibration sees real states, not the zeros a user stored;
- the held-out samples are the last ones, in order (:func:`streaming_split`), and validation streams them through
  the reference and the built model, each with its own state (:func:`collect`), then reports the error over time.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import numpy as np

from edgeexport.errors import CalibrationError, ConfigError

#: suffixes that mark an output as the next value of an input (state -> stateN / state_out / new_state, h0 -> hn)
_IN_SUFFIX = re.compile(r"(_?(in|input|0|prev|previous|old))$", re.IGNORECASE)
_OUT_AFFIX = re.compile(r"(^(new|next|out)_?)|(_?(n|out|output|new|next|1))$", re.IGNORECASE)


def _stem(name: str, pattern: re.Pattern[str]) -> str:
    return pattern.sub("", name).lower()


def detect_pairs(inputs: list[Any], outputs: list[str]) -> dict[str, str]:
    """State pairs guessed from names: input ``state`` and output ``stateN``, ``h0``/``hn``, ``c_in``/``c_out``.
    Only inputs that are not the model's first (the data) and float ones are considered; a guess must be unique."""
    pairs: dict[str, str] = {}
    for spec in inputs[1:]:
        if spec.dtype not in ("float32", "float16"):
            continue
        stem = _stem(spec.name, _IN_SUFFIX) or spec.name.lower()
        hits = [o for o in outputs if o != spec.name and (_stem(o, _OUT_AFFIX) or o.lower()) == stem]
        if len(hits) == 1 and hits[0] not in pairs.values():
            pairs[spec.name] = hits[0]
    return pairs


def check_pairs(pairs: dict[str, str], inputs: list[Any], outputs: list[str]) -> None:
    names = [s.name for s in inputs]
    for inp, out in pairs.items():
        if inp not in names or out not in outputs:
            raise ConfigError(f"--state {inp}={out} does not name an input and an output of the model",
                              f"its inputs are {names}; its outputs are {outputs}",
                              "pass --state INPUT=OUTPUT, the output the model returns for its next call's input")


def check_shapes(pairs: dict[str, str], reference: Any, calib: Any, declared: bool, log: Any) -> dict[str, str]:
    """Each pair's output must be what its input takes (same size and dtype kind, on the first sample). A detected
    pair that is not is dropped with a note (a name match is only a guess); a declared one is an error."""
    feed = calib.sample(0)
    out = reference.infer(feed)
    kept = {}
    for inp, name in pairs.items():
        want, got = np.asarray(feed[inp]), np.asarray(out[name])
        if got.size == want.size and got.dtype.kind == want.dtype.kind:
            kept[inp] = name
            continue
        what = f"{name} is {got.dtype} {list(got.shape)} but {inp} takes {want.dtype} {list(want.shape)}"
        if declared:
            raise ConfigError(f"--state {inp}={name}: the output cannot be fed back into the input", what,
                              "pair each state input with the output the model returns for it")
        log(f"    note: {inp} and {name} look like a state pair by name, but {what}: not streamed")
    return kept


def next_state(out: dict[str, Any], feed: dict[str, np.ndarray], pairs: dict[str, str]) -> dict[str, np.ndarray]:
    """The state inputs of the next call: each pair's output, in its input's dtype and shape."""
    return {i: np.asarray(out[o], feed[i].dtype).reshape(feed[i].shape) for i, o in pairs.items()}


def stream_starts(calib: Any, pairs: dict[str, str]) -> np.ndarray:
    """A boolean per sample: does a new stream start here (see the module's docstring). Read from the data as
    stored, before :func:`carry_reference_state` replaces the states (it keeps the result on ``calib``)."""
    if calib.stream_starts is not None:
        return calib.stream_starts
    n = calib.num_samples
    if calib.data.stream_start is not None:  # the data says where its streams start
        starts = np.asarray(calib.data.stream_start, bool).copy()
        if len(starts) != n:
            raise CalibrationError(f"{len(starts)} stream_start flags for {n} samples", "one flag per sample",
                                   "save stream_start with the samples' length")
        starts[0] = True
        return starts
    zero = np.ones(n, bool)
    for name in pairs:
        store = calib.data.arrays[name]
        start = 0
        for block in store.blocks():
            zero[start:start + len(block)] &= ~block.reshape(len(block), -1).any(axis=1)
            start += len(block)
    starts = zero.copy() if not zero.all() else np.zeros(n, bool)
    starts[0] = True
    return starts


def streaming_split(calib: Any) -> None:
    """Held-out samples: the last ones, in time order (a stream is validated as it runs); calibration samples: a
    seeded draw from the rest, as before. With a separate validation source, its first samples in order."""
    n, holdout = calib.num_samples, len(calib.holdout_idx)
    n_val = getattr(calib.data, "validation_count", None)
    if n_val:  # separate validation data: samples n - n_val .. n - 1
        calib.holdout_idx = np.arange(n - n_val, n - n_val + holdout)
        return
    pool = np.arange(n - holdout)
    rng = np.random.default_rng(calib.seed)
    calib.calib_idx = np.sort(rng.permutation(pool)[:min(len(calib.calib_idx), len(pool))])
    calib.holdout_idx = np.arange(n - holdout, n)


def carry_reference_state(calib: Any, reference: Any, pairs: dict[str, str], log: Any) -> dict[str, Any]:
    """Replace each state input's data with the state the float reference carries into that sample, streaming the
    data in order from each stream start. Returns what was done (for the manifest)."""
    from edgeexport.calibration.store import InMemory
    from edgeexport.util import progress

    starts = calib.stream_starts = stream_starts(calib, pairs)
    last = int(max(np.max(calib.calib_idx), np.max(calib.holdout_idx))) + 1
    carried: dict[str, list[np.ndarray]] = {name: [] for name in pairs}
    state: dict[str, np.ndarray] = {}
    for i in progress(range(last), "streaming the reference for its state", total=last):
        feed = calib.sample(i)
        if starts[i]:
            state = {name: feed[name] for name in pairs}
        for name in pairs:
            carried[name].append(state[name])
        feed.update(state)
        out = reference.infer(feed)
        state = next_state(out, feed, pairs)
    for name in pairs:
        rows = np.stack(carried[name])
        store = calib.data.arrays[name]
        if store.ndim == rows.ndim - 1:  # stored as batch-of-one rows: drop the batch axis again
            rows = rows[:, 0]
        rest = store.rows(last, len(store)) if last < len(store) else rows[:0]
        calib.data.arrays[name] = InMemory(np.concatenate([rows.astype(store.dtype), rest]))
    streams = int(starts[:last].sum())
    log(f"    state: {', '.join(f'{i} <- {o}' for i, o in pairs.items())}; the float model's own state carried "
        f"through {last} samples in order ({streams} stream(s)); validation streams the last "
        f"{len(calib.holdout_idx)} samples through each model with its own state")
    return {"pairs": dict(pairs), "streams": streams, "samples_streamed": last,
            "stream_starts": ("the data's stream_start flags" if calib.data.stream_start is not None else
                              "samples whose stored state is all zeros (or only the first, if every stored state is "
                              "zero)"),
            "holdout": "the last samples, in time order, each model fed its own state"}


def collect(reference: Any, candidate: Any, calib: Any, pairs: dict[str, str]
            ) -> tuple[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]], list[int]]:
    """Stream the held-out samples through both models, each with the state it returned for the previous sample
    (both start a run of consecutive samples from the data's carried state). Returns both outputs and each sample's
    step within its stream."""
    from edgeexport.util import progress

    starts = stream_starts(calib, pairs)
    refs: dict[str, list[np.ndarray]] = {}
    outs: dict[str, list[np.ndarray]] = {}
    steps: list[int] = []
    prev: Optional[int] = None
    r_state: dict[str, np.ndarray] = {}
    c_state: dict[str, np.ndarray] = {}
    step = 0
    for i in progress([int(i) for i in calib.holdout_idx], "validating (streamed)", total=len(calib.holdout_idx)):
        feed = calib.sample(i)
        if prev is None or i != prev + 1 or starts[i]:
            r_state = c_state = {name: feed[name] for name in pairs}
            step = 0
        r = reference.infer({**feed, **r_state})
        o = candidate.infer({**feed, **c_state})
        r_state, c_state = next_state(r, feed, pairs), next_state(o, feed, pairs)
        for name, value in r.items():
            refs.setdefault(name, []).append(np.asarray(value))
            outs.setdefault(name, []).append(np.asarray(o[name]))
        steps.append(step)
        step, prev = step + 1, i
    return refs, outs, steps


def drift(refs: dict[str, list[np.ndarray]], outs: dict[str, list[np.ndarray]], steps: list[int],
          parts: int = 4) -> dict[str, Any]:
    """Mean absolute error of each output by position in its stream (first quarter of the steps ... last), so
    error that grows as the built model's state drifts shows."""
    top = max(steps) + 1 if steps else 1
    edges = np.linspace(0, top, parts + 1)
    out: dict[str, Any] = {"steps": top, "by_part": []}
    for name in refs:
        errs = np.array([float(np.mean(np.abs(np.asarray(o, np.float64) - np.asarray(r, np.float64))))
                         for r, o in zip(refs[name], outs[name])])
        part = np.clip(np.searchsorted(edges, steps, side="right") - 1, 0, parts - 1)
        out[name] = [float(errs[part == k].mean()) if (part == k).any() else None for k in range(parts)]
    out["by_part"] = [f"steps {int(edges[k])}-{int(np.ceil(edges[k + 1])) - 1}" for k in range(parts)]
    return out
