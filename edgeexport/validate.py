"""Comparator and ValidationReport: the built model against the reference, on held-out samples.

Every output's metrics are collected before any decision. The report passes only if every checked metric is
within tolerance; it prints as a table and serializes to JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np

from edgeexport.runner import Runner
from edgeexport.util import progress

_EPS = 1e-12


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na < _EPS and nb < _EPS:
        return 1.0
    if na < _EPS or nb < _EPS:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def is_classifier_like(ref: np.ndarray) -> bool:
    """[batch, classes] float logits/probabilities with at least 2 classes."""
    return ref.ndim == 2 and ref.shape[1] >= 2 and ref.dtype.kind == "f"


EMBEDDING_TASKS = {"feature-extraction", "sentence-similarity", "embedding"}
#: name parts that mark an output as an embedding (a [batch, n] float output is otherwise read as logits)
_EMBEDDING_NAMES = ("emb", "feature", "vector", "pooled", "pooler", "hidden")
#: a probability output's decision threshold (the share of samples whose decision at it flips is checked)
DECISION_THRESHOLD = 0.5


def infer_kind(name: str, refs: list[np.ndarray], task: Optional[str] = None) -> tuple[str, str]:
    """What an output is, from its reference values on the held-out samples: (kind, the reason in words).
    Ambiguous cases fall to the kind with the stricter checks (logits over embedding: top-1 is checked too)."""
    ref = [np.asarray(r) for r in refs]
    if not ref or ref[0].dtype.kind not in "f":
        return "regression", "not a float output"
    per_sample = int(np.prod(ref[0].shape[1:])) if ref[0].ndim else 1
    values = np.concatenate([r.reshape(-1) for r in ref]).astype(np.float64)
    unit = bool(values.size) and float(values.min()) >= 0.0 and float(values.max()) <= 1.0
    if per_sample <= 1:
        if unit:
            return "probability", "one value per sample, every held-out value in [0, 1]"
        return "regression", "one value per sample"
    if task in EMBEDDING_TASKS:
        return "embedding", f"the task is {task}"
    if ref[0].ndim == 2:
        rows = np.concatenate(ref).astype(np.float64)
        if unit and np.allclose(rows.sum(-1), 1.0, atol=1e-3):
            return "probability", "every row is in [0, 1] and sums to 1 (softmax)"
        # before the [0, 1] test: an L2-normalized embedding after a ReLU lies in [0, 1] too
        if np.allclose(np.linalg.norm(rows, axis=-1), 1.0, atol=1e-3):
            return "embedding", "every row has unit length (an L2-normalized embedding)"
        if unit:
            return "probability", "every held-out value is in [0, 1] (independent sigmoids)"
        if any(part in name.lower() for part in _EMBEDDING_NAMES):
            return "embedding", f"its name {name!r} says so"
        return "logits", "[batch, classes] float scores"
    return "regression", f"a [{', '.join(map(str, ref[0].shape))}] tensor compared by value"


def _masked_metrics(refs: list[np.ndarray], outs: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float]:
    """Token outputs [batch, seq, hidden]: cosine over real (unpadded) tokens, and of mean-pooled embeddings."""
    tok_cos, pooled_cos = [], []
    signal = noise = 0.0
    for r, o, m in zip(refs, outs, masks):
        for rb, ob, mb in zip(r, o, m.astype(bool)):
            rv, ov = rb[mb].astype(np.float64), ob[mb].astype(np.float64)
            tok_cos.append(_cos(rv.ravel(), ov.ravel()))
            pooled_cos.append(_cos(rv.mean(0), ov.mean(0)))
            signal += float(np.sum(rv * rv))
            noise += float(np.sum((ov - rv) ** 2))
    snr = 200.0 if noise <= _EPS * max(signal, 1.0) else min(200.0, 10 * np.log10(max(signal, _EPS) / noise))
    return {"cosine_unpadded": float(np.mean(tok_cos)), "snr_db_unpadded": float(snr),
            "pooled_cosine": float(np.mean(pooled_cos)), "pooled_cosine_min": float(np.min(pooled_cos))}


def output_metrics(refs: list[np.ndarray], outs: list[np.ndarray], masks: Optional[list[np.ndarray]] = None,
                   classifier: Optional[bool] = None, kind: Optional[str] = None) -> dict[str, Any]:
    """Metrics for one output over all samples (each list item is one sample's output). ``kind`` (see
    :func:`infer_kind`) adds what fits it: top-1 for logits and softmax probabilities, decision flips for
    probabilities; a cosine only where a sample has more than one value (one value's cosine is always 1)."""
    ref = np.concatenate([r.reshape(r.shape[0] if r.ndim else 1, -1) for r in refs]).astype(np.float64)
    out = np.concatenate([o.reshape(o.shape[0] if o.ndim else 1, -1) for o in outs]).astype(np.float64)
    diff = out - ref
    signal = float(np.sum(ref * ref))
    noise = float(np.sum(diff * diff))
    snr = 200.0 if noise <= _EPS * max(signal, 1.0) else (10 * np.log10(max(signal, _EPS) / noise))
    m: dict[str, Any] = {
        "max_abs": float(np.max(np.abs(diff))) if diff.size else 0.0,
        "mean_abs": float(np.mean(np.abs(diff))) if diff.size else 0.0,
        "rel_err": float(np.sqrt(noise) / max(np.sqrt(signal), _EPS)),
        "snr_db": float(min(snr, 200.0)),
        "samples": len(refs),
    }
    if ref.shape[1] > 1:
        cos = [_cos(r, o) for r, o in zip(ref, out)]
        m.update(cosine=float(np.mean(cos)), cosine_min=float(np.min(cos)))
    if masks is not None and all(r.ndim == 3 and r.shape[:2] == mk.shape for r, mk in zip(refs, masks)):
        m.update(_masked_metrics(refs, outs, masks))
    if kind == "probability":
        m["prob_mean_abs"] = m["mean_abs"]
        softmax = ref.shape[1] > 1 and bool(np.allclose(ref.sum(-1), 1.0, atol=1e-3))
        if not softmax:
            flips = (ref >= DECISION_THRESHOLD) != (out >= DECISION_THRESHOLD)
            m["flip_rate"] = float(np.mean(flips))
            m["decision_threshold"] = DECISION_THRESHOLD
        classifier = softmax
    elif kind is not None:
        classifier = kind == "logits"
    if classifier is None:
        classifier = all(is_classifier_like(r) for r in refs)
    if classifier:
        ref_top = np.concatenate([r.argmax(-1) for r in refs])
        out_top = np.concatenate([o.argmax(-1) for o in outs])
        m["top1"] = float(np.mean(ref_top == out_top))
        if refs[0].shape[1] >= 5:
            out_top5 = np.concatenate([np.argsort(-o, axis=-1)[:, :5] for o in outs])
            m["top5"] = float(np.mean([t in row for t, row in zip(ref_top, out_top5)]))
    return m


@dataclass
class Check:
    output: str
    metric: str
    value: float
    limit: float
    kind: str  # "min" or "max"

    @property
    def passed(self) -> bool:
        return self.value >= self.limit if self.kind == "min" else self.value <= self.limit

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "metric": self.metric, "value": self.value, "limit": self.limit,
                "kind": self.kind, "passed": self.passed}


@dataclass
class ValidationReport:
    outputs: dict[str, dict[str, Any]]
    tolerance: dict[str, float]
    checks: list[Check] = field(default_factory=list)
    task: Optional[dict[str, Any]] = None
    samples: int = 0
    #: stateful models: how the held-out samples were streamed and each output's error over time
    stream: Optional[dict[str, Any]] = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def __bool__(self) -> bool:
        return self.passed

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "samples": self.samples, "resolution_points": self.resolution_points,
                "tolerance": self.tolerance, "outputs": self.outputs, "task": self.task, "stream": self.stream,
                "checks": [c.to_dict() for c in self.checks]}

    @property
    def resolution_points(self) -> Optional[float]:
        """How far one held-out sample moves an agreement or accuracy, in percentage points."""
        return 100.0 / self.samples if self.samples else None

    def table(self) -> str:
        cols = ["output", "kind", "max_abs", "mean_abs", "rel_err", "cosine", "snr_db", "top1", "top5", "flip_rate",
                "pooled_cosine"]
        cols = [c for c in cols if c in ("output", "kind") or any(c in m for m in self.outputs.values())]
        rows = [cols]
        for name, m in self.outputs.items():  # token outputs show their unpadded cosine/SNR (what is checked)
            rows.append([name] + [_fmt(m.get(f"{c}_unpadded", m.get(c))) for c in cols[1:]])
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.task:
            lines.append(f"task accuracy on {self.task['samples']} labelled holdout samples: reference "
                         f"{self.task['reference_accuracy']:.2%}, built {self.task['accuracy']:.2%} "
                         f"(drop {self.task['drop_points']:+.2f} points)")
        inferred = [f"{n} is {m['kind']} ({m['kind_reason']})" for n, m in self.outputs.items()
                    if m.get("kind_reason") and m["kind_reason"] != "declared with --output"]
        if inferred:
            lines.append("output kinds: " + "; ".join(inferred) + " (--output NAME:KIND says otherwise)")
        if self.stream:
            parts = self.stream["by_part"]
            lines.append(f"streamed: each model fed its own state ({', '.join(f'{i} <- {o}' for i, o in self.stream['pairs'].items())}); "
                         f"mean abs error by position in the stream ({', '.join(parts)}):")
            for name in self.outputs:
                if name in self.stream:
                    lines.append(f"  {name}: " + ", ".join(_fmt(v) for v in self.stream[name]))
        if self.samples:
            lines.append(f"{self.samples} held-out samples: one sample moves top-1 agreement or accuracy by "
                         f"{100 / self.samples:.3g} points")
        for c in self.checks:
            op = ">=" if c.kind == "min" else "<="
            lines.append(f"  [{'ok' if c.passed else 'FAIL'}] {c.output}: {c.metric} = {_fmt(c.value)} (needs {op} {_fmt(c.limit)})")
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.4f}"
    return str(v)


def collect(reference: Runner, candidate: Runner, feeds: Iterable[dict[str, np.ndarray]], total: Optional[int] = None
            ) -> tuple[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]], Optional[list[np.ndarray]]]:
    """Run both on every feed. Returns reference outputs, built outputs, and attention masks (if the model has one)."""
    refs: dict[str, list[np.ndarray]] = {}
    outs: dict[str, list[np.ndarray]] = {}
    masks: list[np.ndarray] = []
    for feed in progress(feeds, "validating", total=total):
        if "attention_mask" in feed:
            masks.append(feed["attention_mask"])
        r = reference.infer(feed)
        o = candidate.infer(feed)
        for name, value in r.items():
            refs.setdefault(name, []).append(np.asarray(value))
            outs.setdefault(name, []).append(np.asarray(o[name]))
    return refs, outs, (masks or None)


#: the limits checked for each output kind (a limit applies where the output has that metric)
KIND_CHECKS: dict[str, tuple[str, ...]] = {
    "logits": ("cosine", "snr_db", "top1", "top5", "max_abs", "pooled_cosine"),
    "probability": ("prob_mean_abs", "flip_rate", "top1", "top5", "max_abs"),
    "embedding": ("cosine", "snr_db", "max_abs", "pooled_cosine"),
    "regression": ("cosine", "snr_db", "max_abs", "pooled_cosine"),
    "state": (),
}
_FLOORS = {"cosine", "snr_db", "top1", "top5", "pooled_cosine"}


def output_kinds(refs: dict[str, list[np.ndarray]], declared: Optional[dict[str, str]] = None,
                 task: Optional[str] = None, state_outputs: Iterable[str] = ()) -> dict[str, tuple[str, str]]:
    """Each output's kind and why: declared (--output), a state pair's output (--state), or inferred."""
    declared, state = dict(declared or {}), set(state_outputs)
    kinds = {}
    for name in refs:
        if name in declared:
            kinds[name] = (declared[name], "declared with --output")
        elif name in state:
            kinds[name] = ("state", "fed back as an input (--state)")
        else:
            kinds[name] = infer_kind(name, refs[name], task)
    return kinds


def compare(refs: dict[str, list[np.ndarray]], outs: dict[str, list[np.ndarray]], tolerance: dict[str, float],
            labels: Optional[np.ndarray] = None, masks: Optional[list[np.ndarray]] = None,
            task: Optional[str] = None, kinds: Optional[dict[str, tuple[str, str]]] = None) -> ValidationReport:
    """Compute every output's metrics for its kind (:func:`output_kinds`), then check them against ``tolerance``.

    For token outputs with an attention mask, the ``cosine`` limit applies to the unpadded tokens (padding
    positions are never consumed). Embeddings get no top-k metrics (an embedding's argmax means nothing).
    """
    kinds = kinds or output_kinds(refs, task=task)
    metrics = {}
    for name in refs:
        kind, reason = kinds[name]
        metrics[name] = dict(output_metrics(refs[name], outs[name], masks, kind=kind), kind=kind, kind_reason=reason)
    report = ValidationReport(metrics, dict(tolerance), samples=len(next(iter(refs.values()), [])))
    for name, m in metrics.items():
        for key in KIND_CHECKS[m["kind"]]:
            if key in tolerance and key in m:
                metric = f"{key}_unpadded" if f"{key}_unpadded" in m else key
                report.checks.append(Check(name, metric, m[metric], tolerance[key],
                                           "min" if key in _FLOORS else "max"))
    first = next((n for n in refs if metrics[n]["kind"] in ("logits", "probability") and "top1" in metrics[n]), None)
    if labels is not None and first is not None and "top1" in metrics[first]:
        check_label_range(labels, int(np.asarray(refs[first][0]).shape[-1]), first)
        ref_pred = np.concatenate([r.argmax(-1) for r in refs[first]])
        out_pred = np.concatenate([o.argmax(-1) for o in outs[first]])
        if len(ref_pred) == len(labels):
            ref_right, right = int(np.sum(ref_pred == labels)), int(np.sum(out_pred == labels))
            n = len(labels)
            # from the counts: 2 of 200 samples is a drop of 1.0 point exactly (not 1.0000000000000009 > 1.0)
            report.task = {"metric": "accuracy", "output": first, "samples": int(n),
                           "reference_accuracy": ref_right / n, "accuracy": right / n,
                           "drop_points": (ref_right - right) * 100 / n}
            if "accuracy_drop" in tolerance:
                report.checks.append(Check(first, "accuracy_drop", report.task["drop_points"],
                                           tolerance["accuracy_drop"], "max"))
    return report


def check_label_range(labels: np.ndarray, classes: int, output: str) -> None:
    """Labels are class indices of ``output``'s last axis; one beyond it cannot be the model's class."""
    if labels.size and int(labels.max()) >= classes:
        from edgeexport.errors import CalibrationError

        raise CalibrationError(f"labels go up to class {int(labels.max())}, but output {output!r} has {classes} classes",
                               "accuracy against a class the model cannot predict means nothing",
                               f"pass class indices 0..{classes - 1} aligned with the samples (or drop --labels)")


def error_sample(refs: dict[str, list[np.ndarray]], outs: dict[str, list[np.ndarray]], limit: int = 20000,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Per output, up to ``limit`` elementwise errors (built - reference), drawn evenly at random (for histograms)."""
    rng = np.random.default_rng(seed)
    sample = {}
    for name in refs:
        diff = np.concatenate([(np.asarray(o, np.float64) - np.asarray(r, np.float64)).ravel()
                               for r, o in zip(refs[name], outs[name])])
        if diff.size > limit:
            diff = diff[np.sort(rng.choice(diff.size, limit, replace=False))]
        sample[name] = diff.astype(np.float32)
    return sample


def holdout_report(ref: Runner, cand: Runner, config: Any, calib: Any
                   ) -> tuple["ValidationReport", dict[str, list], dict[str, list]]:
    """The gate's comparison: both runners on every held-out sample of ``calib`` (a CalibrationSet), checked
    against ``config``'s tolerance (and the task metric where labels exist), each output by its kind. A stateful
    model (``config.state``) is streamed: each runner gets the state it returned for the previous sample."""
    steps = None
    if config.state:
        from edgeexport import stream

        refs, outs, steps = stream.collect(ref, cand, calib, config.state)
        masks = None
    else:
        refs, outs, masks = collect(ref, cand, calib.holdout(), total=len(calib.holdout_idx))
    kinds = output_kinds(refs, config.outputs, config.task, config.state.values())
    report = compare(refs, outs, config.resolved_tolerance(), calib.holdout_labels(), masks=masks, task=config.task,
                     kinds=kinds)
    if steps is not None:
        from edgeexport import stream

        report.stream = dict(stream.drift(refs, outs, steps), pairs=dict(config.state))
    return report, refs, outs
