"""Command-line front end. Thin: it turns flags into a BuildConfig and calls the pipeline.

Heavy libraries (torch, onnxruntime) are imported only inside the commands that need them.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import click
from click.core import ParameterSource

from edgeexport import __version__
from edgeexport.config import CALIB_METHODS, OUTPUT_KINDS, TOLERANCE_KEYS
from edgeexport.errors import BundleError, EdgeExportError, UsageError, ValidationFailed
from edgeexport.targets import DEFAULT_TARGET, known_precisions, layer_search_names, public_names, target_help

# CLI parameter -> path in the BuildConfig dict (and an optional converter)
_PARAM_PATHS: dict[str, tuple[str, ...]] = {
    "target": ("target",), "model": ("model",), "precision": ("precision",), "opset": ("opset",),
    "out": ("out",), "force": ("force",), "calib": ("calibration", "path"), "labels": ("calibration", "labels"),
    "calib_method": ("calibration", "method"), "calib_samples": ("calibration", "samples"),
    "holdout": ("calibration", "holdout"), "min_holdout": ("calibration", "min_holdout"), "seed": ("calibration", "seed"), "val": ("calibration", "validation_path"),
    "percentile": ("calibration", "percentile"), "bench_runs": ("bench", "runs"), "threads": ("bench", "threads"),
    "golden": ("golden_samples",), "task": ("task",), "max_length": ("calibration", "max_length"),
    "budget_steps": ("budget_steps",), "explain": ("explain",), "archive": ("archive",),
    "diagnose": ("diagnose",),
}


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--{name} {text!r} is not a comma-separated list of numbers", "", f"e.g. --{name} 0.485,0.456,0.406") from None


def parse_budget(text: str) -> dict[str, float]:
    from edgeexport.config import BUDGET_METRICS

    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    try:
        number = float(value)
    except ValueError:
        number = None
    if not sep or key not in BUDGET_METRICS or number is None:
        raise UsageError(f"cannot parse --accuracy-budget {text!r}",
                         f"expected METRIC=VALUE with METRIC one of {', '.join(BUDGET_METRICS)}",
                         "e.g. --accuracy-budget cosine=0.995, top1=0.99 or accuracy-drop=0.5")
    return {key: number}


def _set(d: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        d = d.setdefault(key, {})
    d[path[-1]] = value


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)


def config_from_options(ctx: click.Context, params: dict[str, Any]):
    from edgeexport.config import load_config_file, make_config, parse_input_spec, parse_tolerance

    if params.get("verbose"):
        import os

        os.environ["EDGEEXPORT_VERBOSE"] = "1"
    data: dict[str, Any] = load_config_file(params["config"]) if params["config"] else {}
    for name, path in _PARAM_PATHS.items():
        if name in params and (_given(ctx, name) or (not params["config"] and params[name] is not None)):
            _set(data, path, params[name])
    if params["inputs"]:
        data["inputs"] = [parse_input_spec(s).model_dump() for s in params["inputs"]]
    if params["tolerance"]:
        data.setdefault("tolerance", {}).update(parse_tolerance(params["tolerance"]))
    from edgeexport.config import parse_pairs

    if params.get("outputs"):
        data.setdefault("outputs", {}).update(parse_pairs(params["outputs"], "--output", ":", "NAME:KIND"))
    if params.get("state"):
        data.setdefault("state", {}).update(parse_pairs(params["state"], "--state", "=", "IN=OUT"))
    if params.get("accuracy_budget"):
        data["accuracy_budget"] = parse_budget(params["accuracy_budget"])
    if params.get("prune"):
        from edgeexport.config import parse_prune

        data["prune"] = dict(data.get("prune") or {}, **parse_prune(params["prune"]))
    for key in ("finetune_steps", "finetune_lr"):
        if params.get(key) is not None:
            if not (params.get("prune") or data.get("prune")):
                raise UsageError(f"--{key.replace('_', '-')} needs --prune", "recovery training follows pruning",
                                 "add e.g. --prune structured:0.3")
            data["prune"][key] = params[key]
    if params.get("no_bench"):
        _set(data, ("bench", "enabled"), False)
    for item in params["option"]:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"cannot parse --option {item!r}", "expected KEY=VALUE", "e.g. --option reduce_range=false")
        import yaml

        data.setdefault("target_options", {})[key] = yaml.safe_load(value)
    for option, owners in _target_flags():
        value = params.get(_param_name(option.flag))
        if value is None:
            continue
        target = data.get("target", DEFAULT_TARGET) if "target" in params else None  # compare: each row checks its own
        if target is not None and target not in owners:
            raise UsageError(f"{option.flag} applies to --target {' or '.join(owners)}, not {target}", "",
                             f"drop {option.flag}, or use --option {option.key}=... where that target has it")
        data.setdefault("target_options", {})[option.key] = value
    pre: dict[str, Any] = {}
    if params["image_size"]:
        h, sep, w = params["image_size"].partition("x")
        if not (sep and h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
            raise UsageError(f"--image-size {params['image_size']!r} is not HxW with two positive integers", "",
                             "e.g. --image-size 224x224")
        pre["size"] = [int(h), int(w)]
    for key in ("color", "layout", "scale", "resize_shorter"):
        if params[key] is not None:
            pre[key] = params[key]
    for key in ("mean", "std"):
        if params[key]:
            pre[key] = _floats(params[key], key)
    if pre:
        data.setdefault("calibration", {}).setdefault("preprocess", {}).update(pre)
    if "model" not in data:
        raise UsageError("no model given", "", "pass --model SPEC (see 'edgeexport build --help') or -c config.yaml")
    return make_config(data, params["config"] or "command line")


_RUNTIME_HELP = ("TensorRT bundles on a machine without TensorRT: run the bundle's ONNX on onnxruntime instead "
                 "(labelled as such; not the device's numbers).")


def _bundle_fix(why: str) -> str:
    if "missing" in why and "manifest" in why:
        return "point at a folder written by 'edgeexport build' (or its archive)"
    return "rebuild the bundle, or run it where its runtime is; do not edit its files (their checksums are in " \
           "manifest.json)"


def _no_traceback(command):
    """A command's last line of defence: an unexpected exception (a bug, or a case no check foresaw) is one clear
    message and exit 1, and a JSON object under --json, never a bare traceback (EDGEEXPORT_TRACEBACK=1 shows it)."""
    import functools
    import os

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (EdgeExportError, SystemExit, KeyboardInterrupt, click.exceptions.Exit, click.ClickException):
            raise
        except Exception as e:  # noqa: BLE001 - turned into a report, see the docstring
            if os.environ.get("EDGEEXPORT_TRACEBACK"):
                raise
            where = ""
            tb = e.__traceback__
            while tb is not None:
                where = f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}"
                tb = tb.tb_next
            _fail(EdgeExportError(f"unexpected {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
                                  f"no check of edgeexport caught this input (at {where}); nothing was written",
                                  "rerun with EDGEEXPORT_TRACEBACK=1 and report it with the command line; meanwhile "
                                  "check the inputs the message names"), kwargs.get("as_json", False))
    return wrapper


def _fail(e: EdgeExportError, as_json: bool) -> None:
    click.echo(e.render(), err=True)
    if as_json:
        out = {"ok": False, **e.to_dict()}
        if isinstance(e, ValidationFailed) and e.report is not None:
            out["validation"] = e.report.to_dict()
        if isinstance(e, ValidationFailed) and e.diagnosis:
            out["diagnosis"] = e.diagnosis
        click.echo(json.dumps(out, indent=2))
    sys.exit(e.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeexport")
def main() -> None:
    """Export a PyTorch model to a validated runtime bundle for a device."""


_MODEL_AND_DATA_OPTIONS = [
    click.option("-c", "--config", type=click.Path(dir_okay=False), help="Replay a YAML config written by --dry-run."),
    click.option("--model", help="pkg.module:factory, file.py:factory, TorchScript .pt, torch.export .pt2, .onnx, "
                  "or hf:PATH (Hugging Face folder; needs the [hf] extra)."),
    click.option("--calib", help="Calibration/validation data: .npz (arrays by input name), .npy, an image folder or "
                  "a quoted glob ('photos/*.jpg'), or synthetic:N (random data, recorded as such)."),
    click.option("--task", help="hf: models: the optimum task [default: feature-extraction]; feature-extraction also "
                  "selects embedding metrics; text-generation builds a causal LM with its KV cache (--calib is "
                  "held-out text; see docs/decoders.md)."),
    click.option("--max-length", type=click.IntRange(1, 8192), help="Text: tokens per sample, truncated and padded [default: the --input sequence length, else 128]."),
    click.option("--input", "inputs", multiple=True, help="NAME:SHAPE[:DTYPE], e.g. image:batchx3x224x224:float32."),
    click.option("--output", "outputs", multiple=True, help=f"NAME:KIND: what an output is, which picks its metrics; "
                 f"KIND: {', '.join(OUTPUT_KINDS)} [default: inferred from its shape and values]."),
    click.option("--state", multiple=True, help="IN=OUT: the model returns OUT to be fed back as IN on its next call "
                 "(recurrent state); validated by streaming the held-out samples [default: pairs detected by name, "
                 "e.g. state=stateN]."),
    click.option("--val", help="Separate validation data (same kinds as --calib); default: hold out part of --calib."),
    click.option("--labels", help="Labels (.npy/.npz/.txt) aligned with the --calib samples, for task accuracy."),
    click.option("--calib-method", type=click.Choice(CALIB_METHODS), default="auto", show_default=True,
                 help="int8 activation ranges; auto: percentile for CNNs, minmax for transformers."),
    click.option("--calib-samples", type=click.IntRange(min=1), help="Calibration samples [default: all but the holdout, at most 256]."),
    click.option("--holdout", type=click.IntRange(min=1), help="Held-out validation samples [default: 20%, at most 200]."),
    click.option("--min-holdout", type=click.IntRange(min=1), help="The fewest held-out samples a build accepts "
                 "[default: 10]; lower it knowingly (one sample of N moves an agreement by 100/N points)."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration/holdout split."),
    click.option("--percentile", type=click.FloatRange(50, 100, min_open=True), default=99.999, show_default=True, help="For --calib-method percentile."),
    click.option("--image-size", help="Resize images to HxW [default: the input's H and W]."),
    click.option("--resize-shorter", type=click.IntRange(min=1), help="Resize the shorter side to N, then center-crop to the image size."),
    click.option("--color", type=click.Choice(["rgb", "bgr", "gray"]), help="Image channel order [default: rgb]."),
    click.option("--mean", help="Per-channel mean after scaling, e.g. 0.485,0.456,0.406 [default: 0]."),
    click.option("--std", help="Per-channel std after scaling, e.g. 0.229,0.224,0.225 [default: 1]."),
    click.option("--scale", type=float, help="Pixel scale before mean/std [default: 1/255]."),
    click.option("--layout", type=click.Choice(["nchw", "nhwc"]), help="Image tensor layout [default: nchw]."),
    click.option("--tolerance", multiple=True, help=f"KEY=VALUE overriding a default limit; keys: {', '.join(TOLERANCE_KEYS)}."),
    click.option("--opset", type=click.IntRange(13, 23), default=18, show_default=True),
    click.option("--option", multiple=True, help="Target option KEY=VALUE, e.g. reduce_range=false."),
    click.option("--prune", help="Prune the PyTorch model before export: structured:AMOUNT removes that share of "
                  "channels (smaller and faster), magnitude:AMOUNT zeroes that share of weights (smaller compressed, "
                  "not faster). Validated against the unpruned model."),
    click.option("--finetune-steps", type=click.IntRange(min=0), help="With --prune: recovery steps on every sample "
                  "not held out (labels' loss plus distillation from the unpruned model; distillation alone without "
                  "labels) [default: 0]."),
    click.option("--verbose", is_flag=True, help="Let the converters' own logs (TensorFlow's C++ lines, onnx2tf, "
                 "the quantizers) through to the terminal."),
    click.option("--finetune-lr", type=click.FloatRange(0, 1, min_open=True), help="With --prune: Adam learning rate of the recovery [default: 1e-3]."),
]


def _param_name(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _target_flags() -> list[tuple[Any, list[str]]]:
    """Each flag a registered target declares (targets/<name>/target.py, ``cli_options``), with the targets
    that take it."""
    from edgeexport.targets import all_targets

    flags: dict[str, tuple[Any, list[str]]] = {}
    for target in all_targets():
        for option in target.cli_options:
            flags.setdefault(option.flag, (option, []))[1].append(target.name)
    return list(flags.values())


_MODEL_AND_DATA_OPTIONS += [
    click.option(option.flag, _param_name(option.flag), type=click.Choice(option.choices) if option.choices else str,
                 help=option.help)
    for option, _ in _target_flags()
]


def model_and_data_options(f):
    """The options that say what to build from: shared by build and compare."""
    for option in reversed(_MODEL_AND_DATA_OPTIONS):
        f = option(f)
    return f


@main.command()
@click.option("--target", default=DEFAULT_TARGET, show_default=True, help=f"Backend: {target_help()}.")
@click.option("--precision", type=click.Choice(known_precisions()), default="int8", show_default=True,
              help="Which precisions a target has is in --target's list.")
@model_and_data_options
@click.option("--accuracy-budget", help=f"int8 ({layer_search_names()}): METRIC=VALUE to reach, e.g. cosine=0.995, top1=0.99, "
              "accuracy-drop=0.5; the layers adding the most error move to 16-bit activations (where the target "
              "has them), then float, step by step until it holds.")
@click.option("--budget-steps", type=click.IntRange(1, 32), help="Most rounds of the --accuracy-budget search [default: 8].")
@click.option("--explain", is_flag=True,
              help=f"int8 ({layer_search_names()}): rank layers by the error they add, print the worst, record them and a plot.")
@click.option("--diagnose/--no-diagnose", default=None,
              help="int8 refused by the gate: build up to 3 alternatives (16 bits for the worst layer, another "
                   "calibration method, ...) and say what each measured [default: on].")
@click.option("--out", default="bundle", show_default=True, help="Output bundle folder.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("--archive", type=click.Choice(["tar.gz", "zip"]),
              help="Also pack the bundle as OUT.tar.gz or OUT.zip (the loader opens either, safely).")
@click.option("--bench-runs", type=click.IntRange(min=1), default=50, show_default=True, help="Timed runs in the build's benchmark.")
@click.option("--no-bench", is_flag=True, help="Skip the latency benchmark.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads for the runtime and the reference while benchmarking.")
@click.option("--golden", type=click.IntRange(1, 32), default=3, show_default=True, help="Golden input/output pairs in the bundle.")
@click.option("--dry-run", is_flag=True, help="Resolve everything, print the config as YAML, build nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.pass_context
@_no_traceback
def build(ctx: click.Context, **params: Any) -> None:
    """Convert, quantize, validate and bundle a model.

    The build fails (exit 1, nothing written) when the built model's outputs on held-out samples are out of
    tolerance.
    """
    as_json = params["as_json"]
    try:
        config = config_from_options(ctx, params)
        from edgeexport import pipeline

        if params["dry_run"]:
            click.echo(pipeline.dry_run(config), nl=False)
            return
        result = pipeline.build(config)
    except EdgeExportError as e:
        _fail(e, as_json)
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was written to the output folder", err=True)
        sys.exit(130)
    summary = result.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        from edgeexport.report import speedup_text

        bench = summary.get("benchmark")
        extra = f"; {speedup_text(bench)} vs reference" if bench and "skipped" not in bench else ""
        share = (result.manifest.get("quantization") or {}).get("integer_share") or {}
        if share.get("integer_mac_share", 1.0) < pipeline.MOSTLY_INTEGER:
            extra += f"; only {share['integer_mac_share']:.0%} of the multiply-adds are int8"
        click.echo(f"ok: wrote {result.out} ({config.target}/{config.precision}, validated{extra})")
        click.echo(f"next: python {result.out}/loader.py --selftest    (on the device: pip install -r "
                   f"{result.out}/requirements.txt first)\n      edgeexport inspect {result.out}    "
                   f"edgeexport bench {result.out}", err=True)


def _load_trusted_loader():
    """The loader shipped with this edgeexport, never the (possibly tampered) copy inside the bundle."""
    from edgeexport.bundle import loader

    return loader


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--threads", type=click.IntRange(min=1))
@click.option("--runtime", type=click.Choice(["onnxruntime"]), help=_RUNTIME_HELP)
@click.option("--json", "as_json", is_flag=True)
@_no_traceback
def verify(bundle: str, threads: Optional[int], runtime: Optional[str], as_json: bool) -> None:
    """Re-check every checksum of BUNDLE (a folder, or a .tar.gz/.zip archive) and run its golden self-test."""
    from pathlib import Path

    loader = _load_trusted_loader()
    if not Path(bundle).exists():
        _fail(BundleError(f"bundle {bundle!r} does not exist", "",
                          "check the path: a bundle folder (with manifest.json), or its .tar.gz/.zip archive"), as_json)
    try:
        model = loader.load(bundle, threads=threads, runtime=runtime)
    except loader.BundleError as e:
        _fail(BundleError(f"bundle {bundle!r} failed verification", str(e), _bundle_fix(str(e))), as_json)
    try:
        ok = model.selftest(verbose=not as_json)
    except (loader.BundleError, loader.InputError) as e:
        _fail(BundleError(f"bundle {bundle!r} failed its self-test", str(e), _bundle_fix(str(e))), as_json)
    if as_json:
        click.echo(json.dumps({"ok": ok, "bundle": bundle, "checksums": "ok", "runtime": runtime or "the bundle's"}))
    elif ok:
        click.echo(f"ok: {bundle}: checksums match and the golden self-test passed")
    if not ok:
        click.echo("error: the golden self-test failed: outputs differ from the build's", err=True)
        sys.exit(1)


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.")
@_no_traceback
def inspect(bundle: str, as_json: bool) -> None:
    """Print BUNDLE's manifest as a readable summary."""
    from edgeexport.report import inspect_text

    loader = _load_trusted_loader()
    try:
        manifest = loader.read_manifest(bundle)
    except loader.BundleError as e:
        _fail(EdgeExportError(f"cannot read bundle {bundle!r}", str(e), "point at a folder built by edgeexport"), False)
    click.echo(json.dumps(manifest, indent=2) if as_json else inspect_text(manifest))


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--runs", type=click.IntRange(min=1), default=100, show_default=True, help="Timed runs after the warm-up.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True, max=86400), help="Time budget in seconds instead of a number of runs.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Untimed calls before timing.")
@click.option("--threads", type=click.IntRange(min=1), multiple=True,
              help="Runtime threads [default: the runtime's own]; repeat it (--threads 1 --threads 2) for a table.")
@click.option("--batch", type=click.IntRange(min=1), multiple=True,
              help="Rows per call (needs a named batch dim) [default: 1]; repeat it (--batch 1 --batch 8 "
              "--batch 32) for a table of throughput by batch size.")
@click.option("--cold-runs", type=click.IntRange(min=0), default=3, show_default=True,
              help="Fresh processes for cold start and peak memory (0 skips them).")
@click.option("--runtime", type=click.Choice(["onnxruntime"]), help=_RUNTIME_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the results and protocol as JSON.")
@_no_traceback
def bench(bundle: str, runs: int, duration: Optional[float], warmup: int, threads: tuple[int, ...],
          batch: tuple[int, ...], cold_runs: int, runtime: Optional[str], as_json: bool) -> None:
    """Measure BUNDLE through its own loader: latency percentiles, throughput, cold start, peak memory, size.

    Several --batch or --threads values measure every combination and print one table."""
    from edgeexport.bench import bench_bundle, bench_grid, render_bench, render_grid
    from pathlib import Path

    batches, thread_list = list(dict.fromkeys(batch or (1,))), list(dict.fromkeys(threads or (None,)))
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    try:
        if len(batches) == 1 and len(thread_list) == 1:
            result = bench_bundle(Path(bundle), warmup=warmup, runs=runs, duration_s=duration, threads=thread_list[0],
                                  batch=batches[0], cold_runs=cold_runs, log=log, runtime=runtime)
        else:
            result = bench_grid(Path(bundle), batches, thread_list, cold_runs=cold_runs, log=log, warmup=warmup,
                                runs=runs, duration_s=duration, runtime=runtime)
    except EdgeExportError as e:
        _fail(e, as_json)
    text = render_bench(result) if "grid" not in result else render_grid(result)
    click.echo(json.dumps(result, indent=2) if as_json else text)


def _reproduce(ctx: click.Context) -> str:
    """The command line that repeats this invocation: every option the user set, in canonical form."""
    import shlex

    words = ["edgeexport", ctx.info_name or "compare"]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or not _given(ctx, param.name):
            continue
        value = ctx.params[param.name]
        flag = max(param.opts, key=len)
        if param.is_flag:
            words += [flag] if value else []
        else:
            words += [w for v in (value if param.multiple else [value]) for w in (flag, str(v))]
    return shlex.join(words)


def _csv(text: Optional[str]) -> Optional[list[str]]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


@main.command()
@click.option("--targets", default=",".join(public_names()), show_default=True, help="Comma-separated targets to compare.")
@click.option("--precisions", help="Comma-separated precisions [default: every precision each target has]; "
              "int8-dynamic and dynamic-range both mean each target's int8-weights/float-activations mode.")
@model_and_data_options
@click.option("--out", help="Keep every bundle in this folder (as TARGET-PRECISION/); default: build them in a "
              "temporary folder and discard them.")
@click.option("--force", is_flag=True, help="Replace bundles already in --out.")
@click.option("--report", type=click.Path(dir_okay=False), help="Write a self-contained HTML report here.")
@click.option("--focus", help="TARGET/PRECISION whose error histograms the report shows [default: the recommended].")
@click.option("--runs", type=click.IntRange(min=1), default=100, show_default=True, help="Timed runs per variant per round.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="Interleaved timing rounds.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Untimed calls per variant per round.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads for every runtime and for PyTorch [default: their own].")
@click.option("--time-failed", is_flag=True, help="Also time combinations that fail validation (built again "
              "with the limits lifted, and not kept), to see what the gate protects against.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON on stdout.")
@click.pass_context
@_no_traceback
def compare(ctx: click.Context, **params: Any) -> None:
    """Build, validate and time every target x precision next to PyTorch eager; print one table.

    A combination that cannot be built here, fails validation or breaks is a row that says why. With --task
    text-generation (a decoder; --calib is held-out text) the rows are the decoder precisions, gated on generation
    and timed per token: time to first token and decode tokens/s (docs/decoders.md).
    """
    from pathlib import Path

    from edgeexport import compare as cmp

    as_json = params["as_json"]
    try:
        if min(params["runs"], params["rounds"]) < 1 or params["warmup"] < 0:
            raise UsageError("--runs and --rounds must be at least 1, --warmup at least 0")
        config = config_from_options(ctx, params)
        out = Path(params["out"]) if params["out"] else None
        if out is not None and out.is_dir() and any(out.iterdir()) and not params["force"]:
            raise UsageError(f"--out {str(out)!r} already has files", "a comparison never overwrites bundles unless asked",
                             "pass --force, or choose another --out")
        if params["report"]:
            from edgeexport.htmlreport import require_matplotlib

            require_matplotlib()
        settings = cmp.Settings(warmup=params["warmup"], runs=params["runs"], rounds=params["rounds"],
                                threads=params["threads"], time_failed=params["time_failed"])
        log = (lambda m: click.echo(m, err=True))
        from edgeexport import compare_decoder, decoder_build

        run = compare_decoder.run if decoder_build.is_decoder_task(config.task) else cmp.run
        result = run(config, _csv(params["targets"]) or [], _csv(params["precisions"]), settings, out, log,
                     command=_reproduce(ctx), focus=params["focus"])
        if params["report"]:
            from edgeexport.htmlreport import write_report

            write_report(result, Path(params["report"]))
            log(f"==> wrote {params['report']}")
    except EdgeExportError as e:
        _fail(e, as_json)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.table())
    if result.chosen is None:
        sys.exit(1)


@main.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: a process pool on this machine; ray: tasks on a Ray cluster (the [ray] extra).")
@click.option("--address", help="--executor ray: the cluster's address, e.g. 127.0.0.1:6379 [default: RAY_ADDRESS, "
              "else a cluster started on this machine].")
@click.option("--workers", type=click.IntRange(min=1), help="--executor local: parallel jobs [default: half the CPUs].")
@click.option("--out", help="Results folder [default: the file's 'out', else ./sweep]; bundles go to OUT/jobs/.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@_no_traceback
def sweep(sweep_file: str, executor: str, address: Optional[str], workers: Optional[int], out: Optional[str],
          as_json: bool) -> None:
    """Build, validate and bench models x targets x precisions from SWEEP_FILE, each combination one job.

    Every job does what `edgeexport build` (and `edgeexport bench`) does alone. A rerun reuses every job whose
    config, model and data are unchanged and whose bundle verifies. Exit 1 if a job failed or broke.
    """
    from edgeexport import sweep as sw

    log = (lambda m: click.echo(m, err=True))
    runner = None
    try:
        plan = sw.load_sweep(sweep_file, out)
        if executor == "local" and address:
            raise UsageError("--address applies to --executor ray", "", "drop --address, or add --executor ray")
        runner = sw.LocalExecutor(workers) if executor == "local" else sw.RayExecutor(address)
        report = sw.run(plan, runner, log)
    except EdgeExportError as e:
        _fail(e, as_json)
    except KeyboardInterrupt:
        click.echo("interrupted: finished jobs are kept; run the sweep again to resume", err=True)
        sys.exit(130)
    finally:
        if runner is not None:
            runner.close()
    click.echo(json.dumps(report, indent=2, default=str) if as_json else sw.table(report))
    log(f"==> wrote {plan.out / 'sweep.json'}, sweep.md, sweep.html ({report['built']} built, {report['cached']} "
        f"reused, {report['wall_s']:.1f} s)")
    if any(j["status"].split("-")[-1] != "passed" for j in report["jobs"]):
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
