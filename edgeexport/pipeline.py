"""The one module that chains the steps: load -> resolve inputs -> calibration data -> export ONNX once ->
target build -> validate against the reference on held-out samples -> benchmark -> bundle (atomically)."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional


import numpy as np

from edgeexport.bench import resolve_threads
from edgeexport.bundle.manifest import golden_tolerance, now_iso, versions
from edgeexport.bundle.writer import check_archive_path, check_output_path, write_bundle
from edgeexport.calibration import CalibrationSet, load_calibration
from edgeexport.config import DECODER_TOLERANCES, BuildConfig, InputSpec
from edgeexport.errors import CalibrationError, ConfigError, ValidationFailed
from edgeexport.report import render_markdown
from edgeexport.source import ModelSource, load_source
from edgeexport.targets import get_target
from edgeexport.targets.base import refuse
from edgeexport.validate import ValidationReport, error_sample, holdout_report
from edgeexport.util import heartbeat, remove_stale, tmp_prefix

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class BuildResult:
    config: BuildConfig
    out: Optional[Path] = None
    manifest: dict[str, Any] = field(default_factory=dict)
    report: Optional[ValidationReport] = None
    #: per output, a sample of (built - reference) values on the held-out data, for error histograms
    errors: dict[str, np.ndarray] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "ok": True if self.report is None else self.report.passed,
            "out": str(self.out) if self.out else None,
            "target": self.config.target,
            "precision": self.config.precision,
            "validation": self.report.to_dict() if self.report is not None else None,
            "benchmark": self.manifest.get("benchmark"),
            "calibration": self.manifest.get("calibration"),
            "pruning": self.manifest.get("pruning"),
            "notes": self.manifest.get("notes", []),
        }


def resolve(config: BuildConfig, log: Log = _stderr) -> tuple[BuildConfig, ModelSource, CalibrationSet]:
    """Check the config, load the model and data, and fill in every value the user left to defaults."""
    from edgeexport import decoder_build

    if decoder_build.is_decoder_task(config.task):
        raise ConfigError(f"--task {config.task} is built by `edgeexport build` and `edgeexport compare` only",
                          "sweep and --dry-run do not handle decoders with a KV cache yet",
                          "run edgeexport build once per precision, or edgeexport compare --task text-generation to "
                          "build, validate and time every precision side by side")
    decoder_keys = sorted(k for k in config.tolerance if k in DECODER_TOLERANCES["fp32"])
    if decoder_keys:
        raise ConfigError(f"--tolerance {', '.join(decoder_keys)} applies to --task text-generation only",
                          "other models are judged on their outputs' metrics", "drop it, or build with --task "
                          "text-generation")
    target = get_target(config.target)
    refuse(target.check(config), f"target {config.target!r} cannot build this configuration",
            "change the settings named above")
    check_output_path(Path(config.out), config.force)
    check_archive_path(Path(config.out), config.archive, config.force)
    log(f"==> loading model {config.model}")
    with heartbeat(log, "loading the model"):
        source = load_source(config.model, config.task)
    specs = resolve_inputs(config, source)
    log(f"    inputs: {', '.join(s.describe() for s in specs)}")
    refuse(target.check_inputs(specs, config.calibration.max_length), f"target {config.target!r} cannot take these inputs",
            "declare the inputs with --input")
    calib = load_calibration(config.calibration, specs, source.tokenizer_file)
    summary = calib.summary()
    if calib.data.synthetic:
        log("WARNING: calibration and validation use SYNTHETIC random data (you asked for it with --calib synthetic:N);"
            " the metrics say nothing about real inputs. The manifest records this.")
    if summary["validation_source"]:
        log(f"    data: {summary['calibration_samples']} calibration samples from {summary['source']}, "
            f"{summary['holdout_samples']} validation samples from {summary['validation_source']} (seed {summary['split_seed']})")
    else:
        log(f"    data: {summary['source']} ({summary['total_samples']} samples: {summary['calibration_samples']} "
            f"calibration, {summary['holdout_samples']} held out for validation, seed {summary['split_seed']})")
    for note in calib.data.notes:
        log(f"    note: {note}")
    resolved = config.model_copy(update={"inputs": specs, "task": config.task or source.task})
    if calib.data.preprocess:
        from edgeexport.config import ImagePreprocess

        resolved.calibration = resolved.calibration.model_copy(
            update={"preprocess": ImagePreprocess(**calib.data.preprocess)})
    return resolved, source, calib


def resolve_inputs(config: BuildConfig, source: ModelSource) -> list[InputSpec]:
    if config.inputs:
        names = source.input_names
        if names is not None and source.kind != "onnx" and len(config.inputs) > len(names):
            raise ConfigError(f"--input declares {len(config.inputs)} inputs but the model takes {len(names)} ({names})",
                              "", "declare one --input per forward() argument, in order")
        if source.kind == "onnx" and names is not None:
            unknown = [s.name for s in config.inputs if s.name not in names]
            if unknown:
                raise ConfigError(f"--input names {unknown} are not inputs of the ONNX model",
                                  f"its inputs are {names}", "use the ONNX model's input names")
            # declared inputs override the graph's; the others keep the graph's own shapes (ONNX input order)
            given = {s.name: s for s in config.inputs}
            graph = {s.name: s for s in (source.declared_inputs or [])}
            missing = [n for n in names if n not in given and n not in graph]
            if missing:
                raise ConfigError(f"--input does not declare {missing} and the ONNX model gives no shape for them",
                                  "", "declare every input with --input NAME:SHAPE:DTYPE")
            return [given.get(n) or graph[n] for n in names]
        return list(config.inputs)
    if source.declared_inputs:
        specs = list(source.declared_inputs)
        only = _single_array_name(config.calibration.path)
        if source.generic_names and len(specs) == 1 and only and only != specs[0].name:
            # TorchScript/.pt2 arg names are often generic ('input'); with one input and one array, the exported
            # graph's input takes the data's name (printed, and recorded in the manifest's inputs)
            specs = [specs[0].model_copy(update={"name": only})]
        return specs
    return _specs_from_data(config, source)


def _single_array_name(path: Optional[str]) -> Optional[str]:
    from edgeexport.calibration.sources import LABELS_KEY, STREAM_KEY

    if not path or not path.endswith(".npz") or not Path(path).is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            names = [n for n in z.files if n not in (LABELS_KEY, STREAM_KEY)]
    except Exception:  # unreadable data is reported properly when it is loaded
        return None
    return names[0] if len(names) == 1 else None


def _specs_from_data(config: BuildConfig, source: ModelSource) -> list[InputSpec]:
    from edgeexport.calibration.sources import read_npy, read_npz

    path = config.calibration.path or ""
    names = source.input_names or []
    hint = "declare the inputs with --input NAME:SHAPE:DTYPE (e.g. --input image:1x3x224x224:float32)"
    if not names or not path.endswith((".npz", ".npy")) or not Path(path).is_file():
        raise CalibrationError(f"cannot tell the shapes of the inputs of {config.model!r}",
                               "the model does not carry example inputs", hint)
    placeholder = [InputSpec(name=n, shape=[1]) for n in names]
    raw = read_npz(Path(path), placeholder) if path.endswith(".npz") else read_npy(Path(path), placeholder)
    if source.generic_names and len(names) == 1 and len(raw.arrays) == 1:
        names = list(raw.arrays)  # one input, one array: the ONNX input takes the data's name
    if sorted(raw.arrays) != sorted(names):
        raise CalibrationError(f"calibration arrays {sorted(raw.arrays)} do not match the model inputs {names}", "", hint)
    rows = [InputSpec(name=n, shape=[1, *raw.arrays[n].shape[1:]], dtype=str(raw.arrays[n].dtype)) for n in names]
    # [N, 1, 576] is N rows of a [1, 1, 576] input or N whole feeds of [1, 576]; where the model can be run, the
    # shape it accepts decides (a row per sample first, as for every other source)
    feeds = [InputSpec(name=n, shape=list(raw.arrays[n].shape[1:]), dtype=str(raw.arrays[n].dtype)) for n in names]
    if all(len(f.shape) >= 1 for f in feeds) and source.runs_with(rows) is False and source.runs_with(feeds):
        return feeds
    return rows


# torch.onnx records per-node debug metadata (stack traces, FX nodes, class paths) that can triple a small model's
# file. The module path of each node ('name_scopes') is kept: it maps graph nodes back to the user's layers.
_KEEP_NODE_METADATA = {"pkg.torch.onnx.name_scopes"}


def finalize_onnx(path: Path, specs: list[InputSpec]) -> dict[str, Any]:
    """Name the dynamic dims as the user did (exporters invent names such as 's31'), drop exporter debug metadata."""
    import onnx

    model = onnx.load(str(path))
    before = model.ByteSize()
    for node in model.graph.node:
        keep = [(p.key, p.value) for p in node.metadata_props if p.key in _KEEP_NODE_METADATA]
        del node.metadata_props[:]
        for key, value in keep:
            node.metadata_props.add(key=key, value=value)
    rename: dict[str, str] = {}
    by_name = {s.name: s for s in specs}
    for vi in model.graph.input:
        spec = by_name.get(vi.name)
        if spec is None:
            continue
        for d, want in zip(vi.type.tensor_type.shape.dim, spec.shape):
            if isinstance(want, str) and d.dim_param != want:
                if d.dim_param:
                    rename[d.dim_param] = want
                d.dim_param = want
    if rename:
        for vi in list(model.graph.output) + list(model.graph.value_info):
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param in rename:
                    d.dim_param = rename[d.dim_param]
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    first = model.graph.output[0].type.tensor_type.shape.dim if model.graph.output else []
    classes = first[-1].dim_value if len(first) == 2 and first[-1].dim_value > 1 else None  # [batch, classes]
    return {"stripped_debug_metadata_bytes": before - model.ByteSize(), "renamed_dims": rename,
            "first_output_classes": classes}


def build(config: BuildConfig, log: Log = _stderr) -> BuildResult:
    """Run the whole build. Raises ValidationFailed (with ``.report``) when the outputs are out of tolerance."""
    from edgeexport import decoder_build

    if decoder_build.is_decoder_task(config.task):  # a decoder with its KV cache: its own export and validation
        out, manifest, report = decoder_build.build(config, log)
        return BuildResult(config, out, manifest, report)
    config, source, calib = resolve(config, log)
    return build_resolved(config, source, calib, log)


@dataclass
class Exported:
    """The ONNX exported once from a source, reusable by several builds of the same inputs (compare)."""
    path: Path
    output_names: list[str]
    info: dict[str, Any]
    stats: Optional[dict[str, Any]]
    #: what --prune did to the model before this export (the manifest's ``pruning``); None when not pruned
    pruning: Optional[dict[str, Any]] = None


def export(config: BuildConfig, source: ModelSource, calib: CalibrationSet, path: Path, log: Log = _stderr) -> Exported:
    """Export ONNX from ``source``; with ``config.prune``, from a pruned copy (``source`` stays the reference)."""
    pruning = None
    if config.prune is not None:
        from edgeexport.prune import prune_source

        source, pruning = prune_source(config, source, calib, log)
    log(f"==> exporting ONNX (opset {config.opset}) from {source.kind}" + (" (pruned)" if pruning else ""))
    with heartbeat(log, "exporting"):
        output_names = source.export_onnx(path, config.inputs, config.opset)
    info = finalize_onnx(path, config.inputs)
    labels = calib.holdout_labels()
    if labels is not None and info.get("first_output_classes"):  # before any build: not after it
        from edgeexport.validate import check_label_range

        check_label_range(labels, info["first_output_classes"], output_names[0] if output_names else "output")
    return Exported(path, output_names, info, model_stats(path, calib, log), pruning)


def model_stats(onnx_path: Path, calib: CalibrationSet, log: Log) -> Optional[dict[str, Any]]:
    """FLOPs and parameters of the float model on one held-out sample (for GFLOP/s in benchmarks)."""
    from edgeexport.flops import count_flops

    feed = next(calib.holdout())
    try:
        stats = count_flops(onnx_path, feed)
    except Exception as e:  # informational only: an uncountable graph must not fail the build
        log(f"    note: model FLOPs not counted ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        return None
    batch = max(1, next(iter(feed.values())).shape[0] if feed else 1)
    stats["flops_per_sample"] = stats["flops"] / batch
    found = ", ".join(op for op, n in stats["by_op"].items() if n) or "none of " + stats["counted"].split(" of ")[-1]
    log(f"    model: {stats['params'] / 1e6:.3g} M parameters, {stats['flops_per_sample'] / 1e9:.3g} GFLOP per sample "
        f"(multiply-adds of {found})")
    nested = stats.get("uncounted_in_subgraphs")
    if nested:
        log(f"    note: not counted: {', '.join(f'{n} {op}' for op, n in sorted(nested.items()))} inside If/Loop/Scan "
            "subgraphs")
    return stats


def build_resolved(config: BuildConfig, source: ModelSource, calib: CalibrationSet, log: Log = _stderr,
                   exported: Optional[Exported] = None) -> BuildResult:
    """Build from what :func:`resolve` returned; ``exported`` reuses an ONNX export of the same inputs and opset.
    Export -> (budget search) -> target build -> validation gate -> benchmark -> bundle, one step per function."""
    import shutil

    target = get_target(config.target)
    remove_stale(Path(tempfile.gettempdir()), ("edgeexport-",))  # work folders of builds that were killed
    with tempfile.TemporaryDirectory(prefix=tmp_prefix()) as tmp:
        workdir = Path(tmp)
        onnx_path = workdir / "exported.onnx"
        if exported is None:
            exported = export(config, source, calib, onnx_path, log)
        else:
            shutil.copyfile(exported.path, onnx_path)  # a fresh copy: builds must never share a file they may rewrite
        config = prepare_state(config, source, calib, exported, log)
        step = _Step(config, source, calib, target, workdir, onnx_path, exported, log)
        step.build()
        log(f"==> validating on {len(calib.holdout_idx)} held-out samples")
        with source.reference(step.config.inputs, exported.output_names) as ref, \
                target.load(step.artifact, resolve_threads(config.bench.threads)) as cand:
            step.gate(ref, cand)
            step.measure(ref, cand)
        out = step.package()
    if config.archive:
        from edgeexport.bundle.writer import write_archive

        log(f"==> packing {write_archive(out, config.archive)}")
    return BuildResult(step.config, out, step.manifest, step.report, step.errors)


def prepare_state(config: BuildConfig, source: ModelSource, calib: CalibrationSet, exported: Exported,
                  log: Log) -> BuildConfig:
    """Stateful models (--state, or detected pairs): the held-out samples become the data's last ones in order and
    every sample's state input becomes the state the float model carries into it (edgeexport.stream)."""
    from edgeexport import stream

    unknown = sorted(set(config.outputs) - set(exported.output_names))
    if unknown:
        raise ConfigError(f"--output names {unknown}, which the model does not return",
                          f"its outputs are {exported.output_names}", "use the model's output names")
    pairs = dict(config.state) or stream.detect_pairs(config.inputs, exported.output_names)
    loose = sorted(n for n, k in config.outputs.items() if k == "state" and n not in pairs.values())
    if loose:
        raise ConfigError(f"--output {loose[0]}:state, but no --state pair feeds {loose[0]} back into an input",
                          "a state output is judged by streaming, which needs the input it is fed back into",
                          f"add --state INPUT={loose[0]}, or declare it as another kind (regression, embedding)")
    if not pairs:
        return config
    stream.check_pairs(pairs, config.inputs, exported.output_names)
    with source.reference(config.inputs, exported.output_names) as ref:
        pairs = stream.check_shapes(pairs, ref, calib, declared=bool(config.state), log=log)
        if not pairs:
            return config
        if not config.state:
            log(f"    state: detected {', '.join(f'{i} <- {o}' for i, o in pairs.items())} by name "
                "(--state IN=OUT declares pairs)")
        if calib.stream_starts is None:  # once per data set (compare builds several targets from one)
            stream.streaming_split(calib)
            exported.info["stream"] = stream.carry_reference_state(calib, ref, pairs, log)
    return config.model_copy(update={"state": pairs})


@dataclass
class _Step:
    """One build's state as it passes through the steps of :func:`build_resolved`."""

    config: BuildConfig
    source: ModelSource
    calib: CalibrationSet
    target: Any
    workdir: Path
    onnx_path: Path
    exported: Exported
    log: Log
    artifact: Any = None
    budget: Optional[dict[str, Any]] = None
    report: Any = None
    errors: dict[str, Any] = field(default_factory=dict)
    layers: Optional[dict[str, Any]] = None
    bench: Optional[dict[str, Any]] = None
    golden: list = field(default_factory=list)
    io: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def build(self) -> None:
        """The budget search (if asked), then the target's build, with its notes and integer share printed."""
        log = self.log
        if self.config.accuracy_budget:
            from edgeexport.budget import search

            self.config, self.budget = search(self.config, self.source, self.calib, self.onnx_path,
                                              self.exported.output_names, log)
        log(f"==> building {self.config.target} / {self.config.precision}")
        self.artifact = self.target.build(self.source, self.config, self.calib, self.workdir, self.onnx_path)
        for note in self.artifact.notes:
            log(f"    note: {note}")
        share = self.artifact.settings.get("integer_share")
        if share and "decided_by" in share:
            log(f"    integer: decided by {share['decided_by']}")
        elif share:
            log(f"    integer: {share['integer_mac_share']:.1%} of the multiply-adds, {share['integer_weight_share']:.1%} "
                f"of the weight bytes ({share['float_weighted_layers']} of {share['weighted_layers']} weighted layers "
                "float)")

    def gate(self, ref: Any, cand: Any) -> None:
        """Validate on the holdout; out of tolerance raises ValidationFailed (after a diagnosis for int8)."""
        config, log = self.config, self.log
        self.report, refs, outs = holdout_report(ref, cand, config, self.calib)
        self.errors = error_sample(refs, outs)
        log(self.report.table())
        self.layers = explain(self.artifact, self.calib, self.workdir, log) if config.explain else None
        if self.report.passed:
            if self.artifact.validated_with:
                log(f"    validated with {self.artifact.validated_with}")
            return
        diagnosis = None
        if config.diagnose and config.precision in ("int8", "int8-dynamic") and config.prune is None \
                and not config.accuracy_budget:
            from edgeexport import diagnose

            try:
                diagnosis = diagnose.run(config, self.source, self.calib, self.onnx_path, self.exported.output_names,
                                         self.target, self.artifact, self.report, log)
            except Exception as e:  # the refusal below must not be lost to a failed diagnosis
                log(f"    note: no diagnosis ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})")
        advice = failure_advice(config, self.target)
        if diagnosis and diagnosis["advice"]:
            advice = f"{diagnosis['advice']}; otherwise {advice}"
        raise ValidationFailed(
            f"validation failed: {config.target}/{config.precision} is out of tolerance on "
            f"{self.report.samples} held-out samples; no bundle was written",
            "; ".join(f"{c.output} {c.metric}={c.value:.4g} (limit {c.limit:g})" for c in self.report.failures()),
            ("prune less (a smaller --prune amount) or recover longer (--finetune-steps), or relax the limit "
             "knowingly with --tolerance KEY=VALUE" if config.prune is not None else advice),
            report=self.report, errors=self.errors, diagnosis=diagnosis)

    def measure(self, ref: Any, cand: Any) -> None:
        """The benchmark (or why none can run), the budget's mix against plain int8, and the golden pairs."""
        config, artifact = self.config, self.artifact
        if artifact.bench_skip:  # recorded even when no benchmark was asked for: it says why none can be run
            if config.bench.enabled:
                self.log(f"    benchmark skipped: {artifact.bench_skip}")
            self.bench = {"skipped": artifact.bench_skip}
        elif config.bench.enabled:
            # the device's kernels are timed even where they are not what validated the build (int8 kernels that
            # saturate on this CPU: the Q/DQ graph was validated as written, the kernels give the speed)
            timer = self.target.load_for_timing(artifact, resolve_threads(config.bench.threads))
            with timer or contextlib.nullcontext(cand) as timed:
                self.bench = benchmark(config, ref, timed, self.calib, self.source.reference_kind)
            if timer is not None:
                self.bench["note"] += ("; timed with this CPU's own int8 kernels, whose outputs differ from the "
                                       f"validated ones here ({artifact.validated_with})")
            if self.budget:
                from edgeexport.budget import compare_mix

                self.budget["compared"] = compare_mix(config, self.source, self.calib, self.onnx_path, self.target,
                                                      cand, artifact, self.budget, self.log)
        self.golden = golden_pairs(config, self.calib, cand)
        # inputs as declared (names, named dims), outputs as the built runtime reports them
        self.io = {"inputs": [s.model_dump() for s in config.inputs], "outputs": [t.to_dict() for t in cand.outputs]}

    def package(self) -> Path:
        """The manifest, the report and the files, written atomically as the bundle."""
        config, artifact, exported = self.config, self.artifact, self.exported
        manifest = make_manifest(config, self.source, self.calib, artifact, self.report, self.bench, self.golden,
                                 self.io)
        manifest["export"].update(exported.info)
        manifest["model_stats"] = exported.stats
        if exported.pruning is not None:
            manifest["pruning"] = dict(exported.pruning, model_file_deflated_bytes=deflated_size(artifact.model_path))
        if self.budget:
            manifest["accuracy_budget"] = self.budget
        if self.layers:
            manifest["layer_errors"] = self.layers["record"]
        self.manifest = manifest
        requirements = self.target.requirements(artifact) + (["tokenizers"] if manifest.get("text") else [])
        texts = {"requirements.txt": "\n".join(requirements) + "\n", "report.md": render_markdown(manifest)}
        files = {name: artifact.root / name for name in artifact.files}
        files.update(self.source.bundle_files())
        if self.layers and self.layers["plot"]:
            files[LAYER_PLOT] = self.layers["plot"]
        self.log(f"==> writing bundle to {config.out}")
        return write_bundle(Path(config.out), files, self.golden, manifest, texts, config.force,
                            self.target.loader_backend())


def golden_pairs(config: BuildConfig, calib: CalibrationSet, cand: Any) -> list:
    """The first held-out samples and the built model's outputs. A stateful model's are consecutive steps of one
    stream, each fed the state the built model returned for the step before (what the loader's stream() does)."""
    feeds = [feed for feed, _ in zip(calib.holdout(), range(config.golden_samples))]
    if not config.state:
        return [(feed, cand.infer(feed)) for feed in feeds]
    from edgeexport.stream import next_state

    pairs, golden = config.state, []
    state: dict[str, np.ndarray] = {}
    for feed in feeds:
        feed = {**feed, **state}
        out = cand.infer(feed)
        golden.append((feed, out))
        state = next_state(out, feed, pairs)
    return golden


def failure_advice(config: BuildConfig, target: Any) -> str:
    """What to try when the gate refuses a build, for what this target and precision can do."""
    if config.precision == "int8" and not target.layer_fallback(config):
        tried = "" if config.accuracy_budget else ("--accuracy-budget METRIC=VALUE (e.g. cosine=0.995) to move the "
                                                   "layers that lose the most to 16-bit activations or float; ")
        return (f"{tried}--explain to see which layers lose it; more or more representative calibration data; "
                "or relax the limit knowingly with --tolerance KEY=VALUE")
    if config.precision == "int8-dynamic":
        return ("--precision int8 (static, calibrated ranges), a higher precision, or relax the limit knowingly "
                "with --tolerance KEY=VALUE")
    if config.precision.endswith("-weight"):  # weight-only: no calibration is involved, so none is advised
        return ("smaller weight blocks (--option block_size=16), 8-bit weights (--precision int8-weight), a higher "
                "precision, or relax the limit knowingly with --tolerance KEY=VALUE")
    return ("try another --calib-method or more calibration samples, a higher precision, or relax the limit "
            "knowingly with --tolerance KEY=VALUE")


def deflated_size(path: Path) -> int:
    """Bytes of ``path`` after zlib level 6 (what an archive or a compressed download of it costs)."""
    import zlib

    comp, total = zlib.compressobj(6), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            total += len(comp.compress(chunk))
    return total + len(comp.flush())


LAYER_PLOT = "layer_errors.png"
EXPLAIN_SAMPLES = 64


def explain(artifact, calib: CalibrationSet, workdir: Path, log: Log) -> Optional[dict[str, Any]]:
    """Rank the layers of a Q/DQ model by the error they add, on held-out samples; print the worst; plot them."""
    from edgeexport.sensitivity import depth_plot, rank_layers, render_ranking

    if artifact.float_model is None:
        log("    explain: no float graph to compare with for this target and precision")
        return None
    feeds = [f for f, _ in zip(calib.holdout(), range(EXPLAIN_SAMPLES))]
    rows = rank_layers(artifact.float_model, artifact.model_path, feeds)
    log(f"==> layers adding the most error (int8 vs float, {len(feeds)} held-out samples, channel-averaged SNR):")
    log(render_ranking(rows))
    plot = None
    try:
        plot = depth_plot(rows, workdir / LAYER_PLOT, f"{artifact.target} {artifact.precision}: output SNR by depth")
    except ImportError:
        log("    note: no depth plot (pip install 'edgeexport[report]' for matplotlib)")
    record = {"samples": len(feeds), "measure": "per-channel SNR of each layer's output as its consumers read it "
              "(after its Q/DQ), vs the float graph; ranked by the noise its own quantization makes on float "
              "inputs (output Q/DQ and weight rounding), then by the noise power that grows through it",
              "plot": LAYER_PLOT if plot else None, "ranked": rows[:50], "layers": len(rows)}
    return {"record": record, "plot": plot}


def benchmark(config: BuildConfig, ref, cand, calib: CalibrationSet,
              reference_kind: str = "PyTorch eager") -> dict[str, Any]:
    from edgeexport.bench import BUILD_ROUNDS, interleaved, machine, set_torch_threads, speedup

    feed = next(calib.holdout())
    threads = resolve_threads(config.bench.threads)
    set_torch_threads(threads)  # the reference gets the thread count the built model was loaded with
    ref.infer(feed)
    cand.infer(feed)  # each checks the feed once; the timed calls go straight to the runtime
    timed = interleaved({"reference": lambda: ref._infer_impl(feed), "built": lambda: cand._infer_impl(feed)},
                        config.bench.warmup, config.bench.runs, BUILD_ROUNDS)
    ratio = speedup(timed["reference"], timed["built"])
    return {"reference": timed["reference"], "built": timed["built"], "speedup_vs_reference": ratio["speedup"],
            "speedup_by_round": ratio["speedup_by_round"], "speedup_supported": ratio["supported"],
            "noise": ratio["noise"], "speedup_range": ratio["range"], "rounds": BUILD_ROUNDS, "runs_per_round": config.bench.runs,
            "warmup": config.bench.warmup, "feed_shapes": {k: list(v.shape) for k, v in feed.items()},
            "threads": threads, "threads_note": "the reference and the built model ran with the same thread count",
            "machine": machine(), "reference_kind": reference_kind,
            "note": f"reference = {reference_kind}; the two are timed in interleaved rounds"}


def make_manifest(config: BuildConfig, source: ModelSource, calib: CalibrationSet, artifact, report: ValidationReport,
                  bench: Optional[dict], golden: list, io: dict) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "created": now_iso(),
        "target": artifact.target,
        "precision": artifact.precision,
        "precision_label": honest_label(get_target(artifact.target).precision_label(artifact.precision),
                                        artifact.settings.get("integer_share")),
        "model_file": artifact.files[0],
        "model_files": artifact.model_files,  # all of the model (e.g. OpenVINO's model.xml and model.bin)
        "inputs": io["inputs"],
        "outputs": io["outputs"],
        "runtime": artifact.runtime,
        "runtime_config": artifact.runtime_config,
        "versions": versions(),
        "source": source.describe(),
        "export": {"opset": config.opset, "exporter": "torch.onnx" if source.kind != "onnx" else "none (ONNX given)"},
        "quantization": artifact.settings,
        "calibration": calib.summary(),
        "preprocess": calib.data.preprocess,
        "text": text_settings(config, source, calib),
        "task": config.task,
        "validation": dict(report.to_dict(), runtime=artifact.validated_with or f"{artifact.target} runtime"),
        "benchmark": bench,
        "golden": {"count": len(golden),
                   "tolerance": golden_tolerance(artifact.precision, [o for _, o in golden], artifact.golden_tolerance),
                   "produced_by": "the built model on held-out samples"
                                  + (f" ({artifact.validated_with})" if artifact.validated_with else "")},
        "config": config.model_dump(mode="json"),
        # stateful models: the loader's stream()/reset() feed each OUT back as IN, starting from zeros of this shape
        "state": ({"pairs": dict(config.state),
                   "initial": {i: {"shape": list(np.shape(golden[0][0][i])), "value": 0.0} for i in config.state}}
                  if config.state and golden else None),
        "notes": list(artifact.notes) + list(calib.data.notes),
    }


#: below this share of the multiply-adds in int8, the label and the CLI's last line say what stayed float
MOSTLY_INTEGER = 0.9


def honest_label(label: str, share: Optional[dict[str, Any]]) -> str:
    """A precision's label with what stayed float, where most of the work did: an "int8" LSTM encoder whose
    recurrent layers ONNX Runtime leaves float must not read as int8."""
    if not share or "integer_mac_share" not in share or share["integer_mac_share"] >= MOSTLY_INTEGER:
        return label
    return (f"{label}; but only {share['integer_mac_share']:.0%} of the multiply-adds and "
            f"{share.get('integer_weight_share', 0):.0%} of the weight bytes run in int8, the rest is float")


def text_settings(config: BuildConfig, source: ModelSource, calib: CalibrationSet) -> Optional[dict[str, Any]]:
    """How the device's loader turns strings into inputs (None for models without a tokenizer)."""
    if calib.data.text:
        return calib.data.text
    if source.tokenizer_file is not None:
        from edgeexport.bundle.loader import text_settings as default_text_settings

        return default_text_settings(config.calibration.max_length)
    return None


def dry_run(config: BuildConfig, log: Log = _stderr) -> str:
    resolved, _, _ = resolve(config, log)
    return resolved.to_yaml()


__all__ = ["build", "build_resolved", "dry_run", "export", "resolve", "BuildResult", "Exported"]
