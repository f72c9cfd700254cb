"""The Target and Runner interfaces every backend implements.

A Target checks a config (every rule about its format lives in its own module), builds an Artifact from the
exported ONNX, and loads an Artifact into a Runner. Runners share one contract so validation and benchmarking treat
every backend alike: public methods check inputs, ``_impl`` methods do the work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from edgeexport.runner import Runner, TensorInfo, check_feeds, ort_io  # noqa: F401 (the targets' names)

if TYPE_CHECKING:  # pragma: no cover
    from edgeexport.calibration import CalibrationSet
    from edgeexport.config import BuildConfig
    from edgeexport.source import ModelSource


@dataclass
class Problem:
    """A reason a config cannot be built by a target. ``field`` names the offending setting."""

    field: str
    message: str
    fix: str = ""


@dataclass
class Artifact:
    """What a target produced: files in ``root`` plus everything the manifest should say about them."""

    target: str
    precision: str
    root: Path
    files: list[str]  # relative to root; files[0] is the model file the runtime loads
    settings: dict[str, Any] = field(default_factory=dict)  # quantization / conversion settings, resolved
    runtime: dict[str, str] = field(default_factory=dict)  # runtime package -> version needed on the device
    notes: list[str] = field(default_factory=list)  # things the user should know (fallbacks, rewrites)
    runtime_config: dict[str, Any] = field(default_factory=dict)  # what the device loader needs (e.g. layouts)
    #: why the build-time benchmark would not measure what the device runs ('' = benchmark it)
    bench_skip: str = ""
    #: golden-pair tolerance (fraction of each output's magnitude, min cosine) when the device's runtime differs
    #: from the one that produced the golden outputs; None = the precision's default
    golden_tolerance: Optional[tuple[float, float]] = None
    #: what produced the validation and golden outputs, when it is not the artifact's own runtime
    validated_with: str = ""
    #: the float ONNX graph a Q/DQ model was made from (same tensor names), for per-layer error ranking
    float_model: Optional[Path] = None
    #: a graph (not shipped) that computes what the bundle's device computes where this machine's kernels do not
    #: (dynamic int8 ops with exact integer sums, on a CPU whose int8 kernels saturate); validation runs it
    exact_model: Optional[Path] = None
    #: the files that make up the model when it is more than ``files[0]`` (OpenVINO: model.xml + model.bin)
    model_parts: list[str] = field(default_factory=list)

    @property
    def model_files(self) -> list[str]:
        return self.model_parts or self.files[:1]

    @property
    def model_path(self) -> Path:
        return self.root / self.files[0]


# onnxruntime type strings -> numpy dtype names


def require_modules(modules: tuple[tuple[str, str], ...], extra: str, purpose: str) -> None:
    """Import each (module, pip package), or raise MissingExtraError naming the extra that brings it."""
    import importlib

    from edgeexport.errors import MissingExtraError

    for module, package in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingExtraError(package, extra, purpose) from None


def one_of(value: Any, allowed: tuple[Any, ...]) -> bool:
    """Whether an option's ``value`` is one of ``allowed``; a switch only as true/false (1 == True, but 1 is not a
    switch)."""
    return any(value is a if isinstance(a, bool) else value == a for a in allowed)


@dataclass(frozen=True)
class CliOption:
    """A ``edgeexport build`` flag a target declares: ``--flag VALUE`` sets ``target_options[key]``; the CLI refuses
    it with another --target."""

    flag: str
    key: str
    help: str
    choices: tuple[str, ...] = ()


def refuse(problems: list["Problem"], what: str, default_fix: str) -> None:
    """A target's Problems become one ConfigError naming every offending setting (nothing when there are none)."""
    if problems:
        from edgeexport.errors import ConfigError

        raise ConfigError(what, "; ".join(f"{p.field}: {p.message}" for p in problems),
                          "; ".join(p.fix for p in problems if p.fix) or default_fix)


class Target:
    """Base class for a backend. Each lives in its own unit, ``targets/<name>/``: ``target.py`` (this class) and
    ``backend.py`` (the device side the shipped loader runs). Units never import each other."""

    name: str = ""
    extra: str = ""  # pip extra that brings its runtime, '' for core
    precisions: tuple[str, ...] = ()
    description: str = ""
    #: Python modules a build needs (a missing one means the target's extra is not installed)
    build_imports: tuple[str, ...] = ()
    #: target_options this target understands: name -> (default, one-line meaning)
    options_spec: dict[str, tuple[Any, str]] = {}
    #: its own ``edgeexport build`` flags (each a shorthand for one target option), shown in --help
    cli_options: tuple[CliOption, ...] = ()
    #: wording of a precision where this format differs from the generic label (the manifest's precision_label)
    precision_labels: dict[str, str] = {}
    #: the precision that quantizes weights only, if any (``edgeexport compare`` maps one onto the other)
    weight_only: Optional[str] = None
    #: pip names of what runs its bundles (benchmarks record their versions)
    runtime_packages: tuple[str, ...] = ()
    #: int8 builds can rank layers and keep some in 16 bits or float (--accuracy-budget, --explain); the details
    #: per config are in layer_fallback
    layer_search: bool = False
    #: listed in --help and error messages ('fake', a test double, is not)
    public: bool = True
    #: --task text-generation (a decoder with its KV cache, edgeexport.decoder_build): the precisions this target
    #: builds decoders at (empty: none), and what it says when asked for one it cannot build
    decoder_precisions: tuple[str, ...] = ()
    decoder_refusal: str = "this target has no decoder path"

    def build_decoder(self, config: "BuildConfig", workdir: Path, onnx_path: Path) -> "Artifact":
        """A decoder's KV-cache graph at ``config.precision`` (one of decoder_precisions); no data is used. Targets
        that declare decoder_precisions override it; the others refuse with their decoder_refusal (decoder_build
        checks first, so this is the same refusal for a caller that did not)."""
        from edgeexport.errors import TargetError

        raise TargetError(f"--task text-generation is not supported for --target {self.name}", self.decoder_refusal,
                          "build the decoder for a target that lists decoder precisions")

    def check(self, config: "BuildConfig") -> list[Problem]:
        problems = []
        for key in config.target_options:
            if key not in self.options_spec:
                problems.append(Problem(f"target_options.{key}", f"unknown option for target {self.name!r}: {key!r}",
                                        f"known: {', '.join(self.options_spec) or 'none'}"))
        if config.accuracy_budget or config.explain:
            refusal = self.layer_fallback(config)
            if refusal:
                flag = "--accuracy-budget" if config.accuracy_budget else "--explain"
                problems.append(Problem("accuracy_budget" if config.accuracy_budget else "explain",
                                        f"{flag}: {refusal}", ""))
        method = config.calibration.method
        if config.precision == "int8" and self.calib_methods and method not in self.calib_methods + ("auto",):
            problems.append(Problem("calibration.method", f"target {self.name!r} has no {method} calibration",
                                    f"use --calib-method {' or '.join(self.calib_methods)}"))
        if config.precision not in self.precisions:
            problems.append(
                Problem(
                    "precision",
                    f"target {self.name!r} does not support precision {config.precision!r}",
                    f"use one of {', '.join(self.precisions)}",
                )
            )
        return problems

    #: the --calib-method values this target's static int8 honours (a refused build tries the others); empty:
    #: the target does not calibrate ranges
    calib_methods: tuple[str, ...] = ()

    def trial_options(self, config: "BuildConfig") -> list[tuple[str, str, "BuildConfig"]]:
        """Alternatives worth building when the gate refuses ``config``: (what, how to ask for it, the config).
        The layer-level ones (16 bits or float for the worst layer) and other calibration methods are added by
        the caller; these are the target's own choices."""
        return []

    def trial_overrides(self, config: "BuildConfig") -> dict[str, Any]:
        """target_options for the trial builds of a search (--accuracy-budget), which only validate: e.g. no
        engine build. The final build uses the user's own."""
        return {}

    def precision_label(self, precision: str) -> str:
        from edgeexport.bundle.manifest import PRECISION_LABELS

        return self.precision_labels.get(precision) or PRECISION_LABELS.get(precision, precision)

    def layer_fallback(self, config: "BuildConfig") -> str:
        """'' when this target can rank layers and keep some in float for ``config``; else why it cannot."""
        return f"target {self.name!r} has no per-layer ranking or float fallback"

    def check_inputs(self, specs: list, max_length: int = 128) -> list[Problem]:
        """Rules about the resolved input specs (e.g. static shapes). Called once inputs are known; ``max_length``
        is the token length text inputs are padded to (for fixes that name a shape)."""
        return []

    def build(
        self, source: "ModelSource", config: "BuildConfig", calibration: "CalibrationSet", workdir: Path,
        onnx_path: Path,
    ) -> Artifact:  # pragma: no cover
        """Build from the ONNX the pipeline exported once (``onnx_path``); write only under ``workdir``."""
        raise NotImplementedError

    def load(self, artifact: Artifact, threads: Optional[int] = None) -> Runner:  # pragma: no cover
        """The Runner that validates the artifact: it computes what the bundle's device computes."""
        raise NotImplementedError

    def load_for_timing(self, artifact: Artifact, threads: Optional[int] = None) -> Optional[Runner]:
        """A Runner to time instead of :meth:`load`'s, where that one computes the device's results in a way the
        device would not run them (e.g. int8 Q/DQ pairs run as written on a CPU whose int8 kernels saturate).
        None: time the validating Runner."""
        return None

    def loader_backend(self) -> Optional[Path]:
        """The device-side backend appended to the loader core in this target's bundles: ``backend.py`` beside the
        module that defines the target class (None: a target whose bundles no loader runs, e.g. a test double)."""
        import inspect

        path = Path(inspect.getfile(type(self))).with_name("backend.py")
        return path if path.is_file() else None

    def requirements(self, artifact: Artifact) -> list[str]:
        """Lines of requirements.txt for the device."""
        return ["numpy"]
