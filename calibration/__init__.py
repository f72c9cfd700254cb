"""Calibration data: read it, check it against the model's inputs, split it deterministically.

A :class:`CalibrationSet` gives every sample as a ``{input_name: ndarray}`` feed (batch of one, unless the data
carries whole batches). A seeded permutation splits it into a *calibration* part, which quantization sees, and a
*holdout* part, which only validation sees. Its content hash goes into the manifest.

The data is never held whole: sources are :class:`~edgeexport.calibration.store.Samples` stores that read a sample
or a block when asked (see ``store.py``), so a build's memory does not grow with the size of the data set.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from edgeexport.calibration.store import Broadcast, Concat, RawData, Samples  # noqa: F401 (RawData: the sources' result)
from edgeexport.config import CalibrationConfig, InputSpec
from edgeexport.errors import CalibrationError

MAX_DEFAULT_CALIB = 256
MAX_DEFAULT_HOLDOUT = 200


@dataclass
class CalibrationSet:
    data: RawData
    specs: list[InputSpec]
    calib_idx: np.ndarray
    holdout_idx: np.ndarray
    seed: int
    sha256: str
    #: stateful models: where each stream starts (edgeexport.stream), read before the states are replaced
    stream_starts: Optional[np.ndarray] = None

    @property
    def num_samples(self) -> int:
        return len(next(iter(self.data.arrays.values())))

    def sample(self, i: int) -> dict[str, np.ndarray]:
        feed = {}
        for spec in self.specs:
            arr = self.data.arrays[spec.name]
            feed[spec.name] = arr.rows(i, i + 1) if arr.ndim == len(spec.shape) else arr.row(i)
        return feed

    def calibration(self) -> Iterator[dict[str, np.ndarray]]:
        """Re-iterable stream of calibration feeds (never includes holdout samples)."""
        for i in self.calib_idx:
            yield self.sample(int(i))

    def holdout(self) -> Iterator[dict[str, np.ndarray]]:
        for i in self.holdout_idx:
            yield self.sample(int(i))

    def holdout_labels(self) -> Optional[np.ndarray]:
        if self.data.labels is None:
            return None
        labels = self.data.labels[self.holdout_idx]
        return None if (labels < 0).any() else labels

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.data.description,
            "kind": self.data.kind,
            "synthetic": self.data.synthetic,
            "sha256": self.sha256,
            "total_samples": self.num_samples,
            "calibration_samples": int(len(self.calib_idx)),
            "holdout_samples": int(len(self.holdout_idx)),
            "split_seed": self.seed,
            "has_labels": self.data.labels is not None,
            "validation_source": getattr(self.data, "validation_description", None),
            "preprocess": self.data.preprocess,
            "text": self.data.text,
            "notes": list(self.data.notes),
        }


def content_hash(arrays: dict[str, Samples], labels: Optional[np.ndarray]) -> str:
    """sha256 of the arrays' names, dtypes, shapes and bytes (C order), read a block at a time."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        for block in a.blocks():
            h.update(block.tobytes())
    if labels is not None:
        h.update(b"labels|")
        h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()


def split(n: int, cfg: CalibrationConfig) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split: a seeded permutation; the first ``holdout`` indices are held out for validation."""
    if n < 2:
        raise CalibrationError(
            f"the calibration data has {n} sample(s)",
            "at least 2 are needed: one to calibrate and one held out to validate",
            "provide more samples (e.g. 100+ real inputs)",
        )
    holdout = cfg.holdout if cfg.holdout is not None else min(MAX_DEFAULT_HOLDOUT, max(1, round(0.2 * n)))
    if holdout >= n:
        raise CalibrationError(
            f"--holdout {holdout} leaves no calibration samples out of {n}",
            "validation samples are never used for calibration",
            f"pass --holdout below {n} or provide more data",
        )
    _check_holdout(holdout, cfg, n)
    available = n - holdout
    if cfg.samples is not None and cfg.samples > available:
        raise CalibrationError(
            f"asked for {cfg.samples} calibration samples but only {available} are available",
            f"the data has {n} samples and {holdout} are held out for validation",
            f"pass --calib-samples {available} or fewer, lower --holdout, or provide more data",
        )
    samples = cfg.samples if cfg.samples is not None else min(MAX_DEFAULT_CALIB, available)
    perm = np.random.default_rng(cfg.seed).permutation(n)
    return perm[holdout : holdout + samples], perm[:holdout]


def _check_holdout(holdout: int, cfg: CalibrationConfig, n: Optional[int]) -> None:
    """Too few held-out samples make every metric a coin toss: refuse below ``cfg.min_holdout`` unless lowered."""
    if holdout >= cfg.min_holdout:
        return
    more = (f"provide more data (the default holds out 20%: {5 * cfg.min_holdout}+ samples), pass --holdout "
            f"{cfg.min_holdout} or more" if n is not None else f"provide {cfg.min_holdout}+ validation samples")
    raise CalibrationError(
        f"validation would use {holdout} held-out sample(s); at least {cfg.min_holdout} are needed",
        f"on {holdout} sample(s) one sample moves an agreement or accuracy by {100 / holdout:.3g} points, so the gate "
        "could not tell a good build from a bad one",
        f"{more}, or accept it knowingly with --min-holdout {holdout}")


def load_calibration(cfg: CalibrationConfig, specs: list[InputSpec], tokenizer: Optional[Any] = None) -> CalibrationSet:
    from edgeexport.calibration.sources import read_path, read_source

    raw = read_source(cfg, specs, tokenizer)
    check_arrays(raw, specs)
    n = len(next(iter(raw.arrays.values())))
    if not cfg.validation_path:
        calib_idx, holdout_idx = split(n, cfg)
        return CalibrationSet(raw, specs, calib_idx, holdout_idx, cfg.seed, content_hash(raw.arrays, raw.labels))
    val = read_path(cfg.validation_path, cfg.model_copy(update={"labels": None}), specs, tokenizer)
    check_arrays(val, specs)
    return _with_separate_validation(raw, val, specs, cfg)


def _with_separate_validation(raw: RawData, val: RawData, specs: list[InputSpec], cfg: CalibrationConfig) -> CalibrationSet:
    """Calibrate on ``raw``, validate on ``val`` (a different source): one set, indices into both."""
    n_cal, n_val = (len(next(iter(d.arrays.values()))) for d in (raw, val))
    samples = cfg.samples if cfg.samples is not None else min(MAX_DEFAULT_CALIB, n_cal)
    holdout = cfg.holdout if cfg.holdout is not None else n_val
    for asked, have, what, flag in ((samples, n_cal, "calibration", "--calib-samples"), (holdout, n_val, "validation", "--holdout")):
        if asked > have:
            raise CalibrationError(f"asked for {asked} {what} samples but the {what} data has {have}", "",
                                   f"pass {flag} {have} or fewer, or provide more data")
    _check_holdout(holdout, cfg, None)
    rng = np.random.default_rng(cfg.seed)
    calib_idx = rng.permutation(n_cal)[:samples]
    holdout_idx = n_cal + rng.permutation(n_val)[:holdout]
    labels = None
    if raw.labels is not None or val.labels is not None:
        fill = lambda d, n: d.labels if d.labels is not None else np.full(n, -1, dtype=np.int64)  # noqa: E731
        labels = np.concatenate([fill(raw, n_cal), fill(val, n_val)])
    arrays: dict[str, Samples] = {k: Concat(raw.arrays[k], val.arrays[k]) for k in raw.arrays}
    merged = RawData(arrays, labels, raw.kind, raw.description, raw.synthetic or val.synthetic,
                     raw.notes + [f"validation data: {n}" for n in val.notes] +
                     [f"held-out validation samples come from a separate source: {val.description}"],
                     raw.preprocess, raw.files, raw.text)
    if raw.stream_start is not None or val.stream_start is not None:
        merged.stream_start = np.concatenate([d.stream_start if d.stream_start is not None else np.arange(n) == 0
                                              for d, n in ((raw, n_cal), (val, n_val))])
    merged.validation_description = val.description  # type: ignore[attr-defined]
    merged.validation_count = n_val  # type: ignore[attr-defined]
    return CalibrationSet(merged, specs, calib_idx, holdout_idx, cfg.seed, content_hash(arrays, labels))


_SAFE_CASTS = {("float64", "float32"), ("float16", "float32"), ("int32", "int64"), ("int64", "int32")}


def check_arrays(raw: RawData, specs: list[InputSpec]) -> None:
    """Names, ranks, shapes, dtypes, finiteness and sample counts, with errors that say which array and why."""
    names = {s.name for s in specs}
    got = set(raw.arrays)
    if got != names:
        raise CalibrationError(
            f"calibration arrays {sorted(got)} do not match the model inputs {sorted(names)}",
            "arrays are matched to inputs by name"
            + (f"; missing {sorted(names - got)}" if names - got else "")
            + (f"; unexpected {sorted(got - names)}" if got - names else ""),
            "save the .npz with one array per model input, e.g. np.savez(path, **{'input_name': data})",
        )
    _size_broadcasts(raw, specs)
    counts = set()
    for spec in specs:
        arr = raw.arrays[spec.name]
        rank = len(spec.shape)
        if arr.ndim not in (rank, rank + 1):
            raise CalibrationError(
                f"calibration array {spec.name!r} has shape {list(arr.shape)}; the input is {spec.shape}",
                f"expected rank {rank} (samples along the batch axis) or {rank + 1} (a list of whole feeds)",
                "reshape the data so the first axis counts samples",
            )
        per_sample = list(arr.shape[1:])
        fixed = spec.shape[1:] if arr.ndim == rank else spec.shape
        for i, (want, have) in enumerate(zip(fixed, per_sample)):
            if isinstance(want, int) and want != have:
                raise CalibrationError(
                    f"calibration array {spec.name!r} has shape {list(arr.shape)}; the input is {spec.shape}",
                    f"dimension {i + (1 if arr.ndim == rank else 0)} is {have} but the model needs {want}",
                    "resize the data or declare the input shape with --input NAME:SHAPE:DTYPE",
                )
        if arr.ndim == rank and isinstance(spec.shape[0], int) and spec.shape[0] != 1:
            raise CalibrationError(
                f"calibration array {spec.name!r} has one sample per row but the input's batch size is {spec.shape[0]}",
                "each row would be fed as a batch of 1",
                f"store whole batches as an array of shape [N, {', '.join(map(str, spec.shape))}]",
            )
        if str(arr.dtype) != spec.dtype:
            if (str(arr.dtype), spec.dtype) not in _SAFE_CASTS:
                raise CalibrationError(
                    f"calibration array {spec.name!r} has dtype {arr.dtype}; the input needs {spec.dtype}",
                    "this conversion could change values, so it is not done silently",
                    f"save the data as {spec.dtype}",
                )
            raw.arrays[spec.name] = arr.astype(spec.dtype)  # applied per block as samples are read
            raw.notes.append(f"{spec.name}: cast {arr.dtype} -> {spec.dtype}")
            arr = raw.arrays[spec.name]
        if arr.dtype.kind == "f":
            idx = _nonfinite_samples(arr)
            if len(idx):
                raise CalibrationError(
                    f"calibration array {spec.name!r} contains NaN or Inf in {len(idx)} sample(s), first at index {idx[0]}",
                    "non-finite inputs make calibration ranges and validation metrics meaningless",
                    "clean the data (np.nan_to_num, or drop those samples)",
                )
        counts.add(len(arr))
    if len(counts) > 1:
        raise CalibrationError(
            f"calibration arrays have different sample counts {sorted(counts)}",
            "sample i of every input must belong together",
            "give every array the same length along the first axis",
        )
    if counts and min(counts) > 1 and all(_constant(raw.arrays[s.name]) for s in specs):
        raise CalibrationError(
            f"every sample of {raw.description} is identical ({min(counts)} copies of one input)",
            "int8 ranges calibrated on one input, and a comparison of one output with itself, say nothing about "
            "real inputs: the build would pass whatever the model did",
            "provide real, varied samples (or --calib synthetic:N for a smoke test, recorded as synthetic)")
    if raw.labels is not None and len(raw.labels) != counts.pop():
        raise CalibrationError(
            f"{len(raw.labels)} labels for {len(next(iter(raw.arrays.values())))} samples",
            "labels must align with samples",
            "pass one label per sample",
        )


def _size_broadcasts(raw: RawData, specs: list[InputSpec]) -> None:
    """Single numbers (0-d arrays) are shared by every sample: give them the other arrays' sample count."""
    shared = [s.name for s in specs if isinstance(raw.arrays[s.name], Broadcast)]
    if not shared:
        return
    counts = {len(raw.arrays[s.name]) for s in specs if s.name not in shared}
    if not counts:
        raise CalibrationError(f"{raw.description!r} holds only single numbers ({', '.join(shared)})",
                               "a single number is shared by every sample; other arrays must count the samples",
                               "save at least one input as an array of shape [N, ...] (N samples)")
    for name in shared:
        store = raw.arrays[name]
        assert isinstance(store, Broadcast)
        store.resize(max(counts))
        raw.notes.append(f"{name}: one value ({store.value.tolist()}) shared by every sample")


def _constant(arr: Samples) -> bool:
    """Every sample of ``arr`` equals the first (read a block at a time)."""
    first = None
    for block in arr.blocks():
        rows = block.reshape(len(block), -1)
        if first is None:
            first = rows[:1].copy()
        if not (rows == first).all():
            return False
    return first is not None


def _nonfinite_samples(arr: Samples) -> np.ndarray:
    """Indices of samples holding NaN or Inf, scanned a block at a time."""
    bad, start = [], 0
    for block in arr.blocks():
        bad.append(start + np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(axis=1)))
        start += len(block)
    return np.concatenate(bad) if bad else np.empty(0, np.int64)
