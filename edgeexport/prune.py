"""Pruning before export, judged against the unpruned model.

``--prune structured:A`` removes the share ``A`` of the output channels of every Conv and Linear layer (and what
depends on them: BatchNorm, the next layer's inputs, residual partners) with torch-pruning's dependency graph, ranked
by L2 magnitude. The result is a smaller dense model that every target converts as usual.

``--prune magnitude:A`` zeroes the share ``A`` of each such layer's weights with the smallest magnitude
(``torch.nn.utils.prune``), except in grouped (depthwise) convolutions: a sliver of the size, and the most
sensitive. Shapes do not change, so the file compresses better but runs no faster: dense kernels
multiply the zeros too. The report says so.

Layers that produce the model's outputs are never pruned (their width is the output's shape). ``--finetune-steps
N`` then trains the pruned copy for N Adam steps on the calibration split, never on the held-out samples: the loss
is the unpruned model's outputs (mean squared error relative to their power, i.e. distillation) plus the labels'
cross-entropy when labels exist. It trains in inference mode (BatchNorm statistics kept, dropout off), and keeps the
weights that did best on calibration samples set aside from training. The unpruned model stays the validation
reference.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from edgeexport.errors import PruneError, missing_extra
from edgeexport.util import progress, torch_threads

if TYPE_CHECKING:  # pragma: no cover
    from edgeexport.calibration import CalibrationSet
    from edgeexport.config import BuildConfig
    from edgeexport.source import ModelSource

Log = Callable[[str], None]
_KINDS = {"onnx": "an ONNX model", "torchscript": "a TorchScript model", "exported_program": "a torch.export program",
          "hf": "a Hugging Face model"}
#: the most per-layer channel changes the manifest lists
MAX_LISTED_LAYERS = 200


def _weighted_types():
    import torch.nn as nn

    return (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prune_source(config: "BuildConfig", source: "ModelSource", calib: "CalibrationSet", log: Log
                 ) -> tuple["ModelSource", dict[str, Any]]:
    """A copy of ``source`` whose module is pruned (and recovered), and what the manifest records about it."""
    import torch

    from edgeexport.reference import flatten_outputs

    from edgeexport.source import FactorySource

    spec = config.prune
    assert spec is not None
    if not isinstance(source, FactorySource):
        raise PruneError(f"--prune cannot prune {_KINDS.get(source.kind, source.kind)}",
                         "pruning rebuilds the layers of a PyTorch nn.Module; this model is not loaded as one "
                         "(Hugging Face models: transformer heads need their own pruning rules, not built yet)",
                         "pass a factory that returns the nn.Module (--model pkg.module:factory or file.py:factory)")
    original = source.module
    example = source.export_args(config.inputs)
    pruned = copy.deepcopy(original).eval()
    with torch.no_grad():
        shapes = [tuple(t.shape) for t in flatten_outputs(original(*example))]
    protected = output_layers(pruned, example)
    before = census(pruned)
    if not before["layers"]:
        raise PruneError("--prune found no Conv or Linear layer to prune", "", "prune a model with such layers")
    log(f"==> pruning: {spec.method} {spec.amount:g} of every Conv/Linear layer except the "
        f"{len(protected)} producing outputs ({', '.join(_names(pruned, protected)) or 'none found'})")
    if spec.method == "structured":
        library = _structured(pruned, example, spec.amount, protected)
    else:
        library = _magnitude(pruned, spec.amount, protected)
    with torch.no_grad():
        got = [tuple(t.shape) for t in flatten_outputs(pruned.eval()(*example))]
    if got != shapes:
        raise PruneError(f"pruning changed the model's output shapes from {shapes} to {got}",
                         "the layer that sets an output's width was not recognised as an output layer",
                         "use --prune magnitude:AMOUNT, which never changes shapes")
    recovery = finetune(pruned, original, calib, config, log) if spec.finetune_steps else None
    if spec.method == "magnitude":
        _make_permanent(pruned)
    after = census(pruned.eval())
    record = _record(config, library, before, after, _names(pruned, protected), recovery)
    log(f"    {record['summary']}")
    out = copy.copy(source)
    out.module = pruned
    return out, record


def output_layers(module: Any, example: tuple) -> list[Any]:
    """The Conv/Linear layers that set the width of a model output, whose channels are never pruned:

    - a layer whose output tensor is a model output (also as a view, e.g. flattened);
    - a layer whose channel group reaches an output through other ops (a softmax, a residual add): torch-pruning's
      dependency graph says so, when it is installed;
    - the last one that runs (the usual classifier), in any case."""
    import torch

    from edgeexport.reference import flatten_outputs

    produced: dict[int, Any] = {}
    order: list[Any] = []

    def hook(mod, _inputs, out):
        if isinstance(out, torch.Tensor):
            produced[out.data_ptr()] = mod
        order.append(mod)

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, _weighted_types())]
    try:
        with torch.no_grad():
            outputs = flatten_outputs(module(*example))
    finally:
        for h in handles:
            h.remove()
    found = [produced[t.data_ptr()] for t in outputs if t.data_ptr() in produced]
    found += _reaching_outputs(module, example)
    if order:
        found.append(order[-1])
    unique: list[Any] = []
    for m in found:
        if all(m is not u for u in unique):
            unique.append(m)
    return unique


def _reaching_outputs(module: Any, example: tuple) -> list[Any]:
    try:
        import torch_pruning as tp
    except ImportError:
        return []
    graph = tp.DependencyGraph().build_dependency(module, example_inputs=example)
    found = []
    for m in module.modules():
        if isinstance(m, _weighted_types()):
            group = graph.get_pruning_group(m, graph.get_pruner_of_module(m).prune_out_channels, idxs=[0])
            if any(item.dep.target.type == tp.ops.OPTYPE.OUTPUT for item in group):
                found.append(m)
    return found


def _names(module: Any, layers: list[Any]) -> list[str]:
    return [name for name, m in module.named_modules() if any(m is layer for layer in layers)]


def census(module: Any) -> dict[str, Any]:
    """Parameters, prunable weights and their zeros, output channels per Conv/Linear layer."""
    layers, weights, zeros = {}, 0, 0
    for name, m in module.named_modules():
        if isinstance(m, _weighted_types()):
            w = m.weight.detach()
            layers[name] = int(w.shape[0])
            weights += w.numel()
            zeros += int((w == 0).sum())
    params = sum(p.numel() for p in module.parameters())
    return {"params": int(params), "weights": int(weights), "zero_weights": int(zeros), "layers": layers}


def _structured(module: Any, example: tuple, amount: float, protected: list[Any]) -> str:
    try:
        import torch_pruning as tp
    except ImportError:
        raise missing_extra("torch-pruning", "prune", "--prune structured") from None
    try:
        pruner = tp.pruner.MetaPruner(module, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=amount, ignored_layers=protected)
        pruner.step()
    except Exception as e:  # torch-pruning traces the model; an op it cannot follow ends here
        raise PruneError("structured pruning failed", f"torch-pruning: {type(e).__name__}: {str(e)[:300]}",
                         "try --prune magnitude:AMOUNT, or a smaller amount") from None
    return f"torch-pruning {getattr(tp, '__version__', '?')} (MetaPruner, group L2 magnitude)"


def _magnitude(module: Any, amount: float, protected: list[Any]) -> str:
    from torch.nn.utils import prune

    for m in module.modules():
        if isinstance(m, _weighted_types()) and not _depthwise(m) and all(m is not p for p in protected):
            prune.l1_unstructured(m, "weight", amount=amount)  # a mask: zeros stay zero while recovering
    return "torch.nn.utils.prune (l1_unstructured per layer; grouped/depthwise convolutions left dense)"


def _depthwise(m: Any) -> bool:
    """A grouped convolution (depthwise: a few weights per channel, a sliver of the model's size and the layers it
    is most sensitive to); magnitude pruning leaves them dense."""
    return getattr(m, "groups", 1) > 1


def _make_permanent(module: Any) -> None:
    from torch.nn.utils import prune

    for m in module.modules():
        if prune.is_pruned(m) and hasattr(m, "weight_orig"):
            prune.remove(m, "weight")


def finetune(student: Any, teacher: Any, calib: "CalibrationSet", config: "BuildConfig", log: Log) -> dict[str, Any]:
    """A short recovery of ``student`` on the calibration split: distillation from ``teacher`` (relative MSE of every
    output), plus cross-entropy on the labels when the data has them and the model has one classifier output.

    A fifth of the calibration split (at most 64 samples) is kept aside from training. The distillation loss on it
    is measured before training and every eighth of the way, and the best weights are kept: on little data, more
    steps can make a model agree less with the original (EfficientNet-Lite0 on 112 photos did), and then the model
    before recovery is what the build gets. The held-out validation samples are never used here."""
    import torch
    import torch.nn.functional as F

    spec = config.prune
    assert spec is not None
    # every sample that is not held out trains (calibration may use a subset of them; recovery wants them all)
    pool = np.setdiff1d(np.arange(calib.num_samples), np.asarray(calib.holdout_idx))
    pool = np.random.default_rng(config.calibration.seed).permutation(pool)
    aside = pool[: min(64, len(pool) // 5)] if len(pool) >= 10 else pool[:0]
    pool = pool[len(aside):]
    labels = calib.data.labels
    labels = labels[pool] if labels is not None and (labels[pool] >= 0).all() else None
    batch = min(spec.finetune_batch, len(pool))
    torch.manual_seed(config.calibration.seed)
    rng = np.random.default_rng(config.calibration.seed)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=spec.finetune_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.finetune_steps)
    # dropout stays off, so the student matches the teacher's deterministic outputs. BatchNorm trains on batch
    # statistics when batches are large enough to estimate them (a residual CNN pruned 30% recovered to 97.5%
    # instead of 93.5% held-out accuracy with it); with smaller batches it stays frozen. Either way its statistics
    # are re-estimated on the training pool (pruning changed what each BatchNorm sees), where that lowers the loss on
    # the samples kept aside, and at every checkpoint
    teacher.eval()
    student.eval()
    bn_train = batch >= BN_TRAIN_BATCH
    check_every = max(1, spec.finetune_steps // 8)
    initial = _aside_loss(student, teacher, calib, aside, config, batch)
    bn = _reestimate_bn(student, calib, pool, config, batch, aside_loss=lambda: _aside_loss(
        student, teacher, calib, aside, config, batch), before=initial)
    if bn["used"]:
        log(f"    recovery: BatchNorm statistics re-estimated on {bn['samples']} samples: loss on the samples kept "
            f"aside {initial:.4g} -> {bn['aside_loss']:.4g}")
    start = bn["aside_loss"] if bn["used"] else initial
    best = (start, 0, copy.deepcopy(student.state_dict()))
    holdout = _holdout_accuracy_probe(student, calib, config, batch)
    checkpoints = [{"step": 0, "aside_loss": start, "holdout_accuracy": holdout()}]
    losses: list[float] = []
    use_labels = False
    with torch_threads(config.bench.threads):
        for step in progress(range(1, spec.finetune_steps + 1), f"recovering ({spec.finetune_steps} steps)",
                             total=spec.finetune_steps):
            pick = rng.choice(len(pool), size=batch, replace=False)
            _bn_mode(student, bn_train)
            outputs, targets = _forward_pair(student, teacher, calib, pool[pick], config, batch)
            _bn_mode(student, False)
            loss = _distill_loss(outputs, targets)
            use_labels = (labels is not None and len(outputs) == 1 and outputs[0].ndim == 2
                          and outputs[0].shape[0] == len(pick) and int(labels.max()) < outputs[0].shape[1])
            if use_labels and labels is not None:
                loss = loss + F.cross_entropy(outputs[0], torch.from_numpy(labels[pick]).long())
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if len(aside) and (step % check_every == 0 or step == spec.finetune_steps):
                if bn["used"] or bn_train:
                    _reestimate_bn(student, calib, pool, config, batch)
                value = _aside_loss(student, teacher, calib, aside, config, batch)
                checkpoints.append({"step": step, "aside_loss": value, "holdout_accuracy": holdout()})
                if value < best[0]:
                    best = (value, step, copy.deepcopy(student.state_dict()))
    if len(aside):
        student.load_state_dict(best[2])
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    objective = "labels' cross-entropy + distillation" if use_labels else "distillation from the unpruned model"
    log(f"    recovery: {spec.finetune_steps} steps of {batch} samples from {len(pool)} ({objective}); "
        f"loss {first:.4g} -> {last:.4g}")
    if len(aside):
        log(f"    recovery: distillation loss on {len(aside)} samples kept aside {initial:.4g} -> "
            f"{best[0]:.4g}; " + (f"kept the weights of step {best[1]}" if best[1] else
                                  "no step improved it: kept the model before recovery"))
    if checkpoints[0]["holdout_accuracy"] is not None:
        log("    recovery: held-out accuracy by checkpoint (reported, never used to choose): " + ", ".join(
            f"step {c['step']} {100 * float(c['holdout_accuracy'] or 0):.2f}%" for c in checkpoints))
    return {"steps": spec.finetune_steps, "lr": spec.finetune_lr, "batch": batch, "objective": objective,
            "optimizer": "Adam, cosine-annealed learning rate; dropout off",
            "batchnorm": (f"trained on batch statistics (batch {batch}), re-estimated at each checkpoint" if bn_train
                          else f"frozen (batch {batch} < {BN_TRAIN_BATCH} is too small to estimate statistics)"),
            "samples": "every sample not held out for validation (never held-out ones)", "pool": int(len(pool)),
            "batchnorm_reestimated": bn,
            "loss_first10": first, "loss_last10": last, "aside_samples": int(len(aside)),
            "aside_loss_before": initial, "aside_loss_kept": best[0], "kept_step": best[1],
            "checkpoints": checkpoints,
            "checkpoint_note": "held-out accuracy is measured at each checkpoint for the record; the kept weights "
                               "are chosen on the samples kept aside from training, never on held-out ones"}


def _batch_args(calib: "CalibrationSet", idx: np.ndarray, config: "BuildConfig") -> list:
    """The samples ``idx`` concatenated into one batch per model input, as torch tensors in input order."""
    import torch

    feeds = [calib.sample(int(i)) for i in idx]
    return [torch.from_numpy(np.concatenate([f[s.name] for f in feeds])) for s in config.inputs]


def _batch_norms(module: Any) -> list:
    import torch

    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _bn_mode(module: Any, train: bool) -> None:
    """BatchNorm layers alone into training mode (batch statistics, running averages updated) or back."""
    for m in _batch_norms(module):
        m.train(train)


#: BatchNorm trains on batch statistics during recovery from this batch size up (frozen below)
BN_TRAIN_BATCH = 16
#: most training samples a BatchNorm re-estimation reads
BN_SAMPLES = 512


def _reestimate_bn(student: Any, calib: "CalibrationSet", pool: np.ndarray, config: "BuildConfig", batch: int,
                   aside_loss: Callable[[], float] | None = None, before: float | None = None) -> dict[str, Any]:
    """Recompute every BatchNorm's running mean and variance from up to :data:`BN_SAMPLES` training samples (a
    cumulative average, the rest of the model in inference mode). With ``aside_loss``, keep the new statistics only
    if they lower it below ``before``; returns what was done."""
    import torch

    norms = [m for m in _batch_norms(student) if m.track_running_stats]
    if not norms or not len(pool):
        return {"used": False, "reason": "no BatchNorm layer" if not norms else "no training samples"}
    saved = [({k: v.clone() for k, v in m.state_dict().items()}, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch
        m.train()
    idx = pool[:BN_SAMPLES]
    step = max(2, batch)
    try:
        with torch.no_grad():
            for start in range(0, len(idx), step):
                chunk = idx[start : start + step]
                if len(chunk) < 2:
                    break
                student(*_batch_args(calib, chunk, config))
    finally:
        for m, (_, momentum) in zip(norms, saved):
            m.momentum = momentum
            m.eval()
    if aside_loss is None:
        return {"used": True, "samples": int(len(idx))}
    value = aside_loss()
    if before is not None and value >= before:
        for m, (state, _) in zip(norms, saved):
            m.load_state_dict(state)
        return {"used": False, "reason": f"it did not lower the loss on the samples kept aside ({before:.4g} -> "
                f"{value:.4g})", "samples": int(len(idx))}
    return {"used": True, "samples": int(len(idx)), "layers": len(norms), "aside_loss": value}


def _holdout_accuracy_probe(student: Any, calib: "CalibrationSet", config: "BuildConfig", batch: int
                            ) -> Callable[[], float | None]:
    """A function measuring the student's task accuracy on (up to 512) held-out labelled samples, or None when
    there are no labels or no single classifier output."""
    import torch

    from edgeexport.reference import flatten_outputs

    labels = calib.holdout_labels()
    if labels is None:
        return lambda: None
    idx = np.asarray(calib.holdout_idx)[:512]
    labels = labels[: len(idx)]

    def accuracy() -> float | None:
        right = 0
        with torch.no_grad():
            for start in range(0, len(idx), batch):
                chunk = idx[start : start + batch]
                outs = flatten_outputs(student(*_batch_args(calib, chunk, config)))
                if len(outs) != 1 or outs[0].ndim != 2:
                    return None
                right += int((outs[0].argmax(1).numpy() == labels[start : start + len(chunk)]).sum())
        return right / len(idx)
    return accuracy


def _forward_pair(student: Any, teacher: Any, calib: "CalibrationSet", idx: np.ndarray, config: "BuildConfig",
                  batch: int) -> tuple[list, list]:
    import torch

    from edgeexport.reference import flatten_outputs

    args = _batch_args(calib, idx, config)
    try:
        with torch.no_grad():
            targets = flatten_outputs(teacher(*args))
        outputs = flatten_outputs(student(*args))
    except Exception as e:  # e.g. a model that only takes a batch of one
        raise PruneError(f"recovery failed: the model's forward raised {type(e).__name__} on a batch of {len(idx)} "
                         "calibration samples", str(e).strip().splitlines()[0][:300] if str(e).strip() else "",
                         "set prune.finetune_batch: 1 in a -c config, or drop --finetune-steps") from None
    return outputs, targets


def _distill_loss(outputs: list, targets: list):
    import torch.nn.functional as F

    return sum(F.mse_loss(o.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-12)
               for o, t in zip(outputs, targets) if o.is_floating_point())


def _aside_loss(student: Any, teacher: Any, calib: "CalibrationSet", aside: np.ndarray, config: "BuildConfig",
                batch: int) -> float:
    import torch

    if not len(aside):
        return float("inf")
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(aside), batch):
            chunk = aside[start : start + batch]
            outputs, targets = _forward_pair(student, teacher, calib, chunk, config, batch)
            total += float(_distill_loss(outputs, targets)) * len(chunk)
    return total / len(aside)


def _record(config: "BuildConfig", library: str, before: dict[str, Any], after: dict[str, Any], protected: list[str],
            recovery: dict[str, Any] | None) -> dict[str, Any]:
    spec = config.prune
    assert spec is not None
    changed = {k: [v, after["layers"].get(k, 0)] for k, v in before["layers"].items() if after["layers"].get(k) != v}
    ch_before, ch_after = sum(before["layers"].values()), sum(after["layers"].values())
    sparsity = after["zero_weights"] / max(1, after["weights"])
    if spec.method == "structured":
        summary = (f"structured: {ch_before - ch_after} of {ch_before} channels removed "
                   f"({len(changed)} layers); parameters {before['params']:,} -> {after['params']:,} "
                   f"({100 * (1 - after['params'] / before['params']):.1f}% fewer)")
        note = "whole channels removed: the model is smaller and does less arithmetic on every target"
    else:
        summary = (f"magnitude: {100 * sparsity:.1f}% of Conv/Linear weights are zero "
                   f"({after['zero_weights']:,} of {after['weights']:,}); shapes unchanged")
        note = ("unstructured zeros: the model file compresses better (e.g. in an archive or an OTA update), but "
                "dense kernels multiply the zeros too, so latency and the uncompressed size do not change")
    return {"method": spec.method, "amount": spec.amount, "library": library, "protected_layers": protected,
            "params_before": before["params"], "params_after": after["params"],
            "channels_before": ch_before, "channels_after": ch_after, "weight_sparsity": sparsity,
            "layers_changed": dict(list(changed.items())[:MAX_LISTED_LAYERS]), "recovery": recovery,
            "reference": "the unpruned model", "summary": summary, "note": note}
