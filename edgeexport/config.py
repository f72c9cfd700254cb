"""BuildConfig: the typed, validated description of one build.

The CLI turns flags into a BuildConfig; ``--dry-run`` writes the resolved config as YAML and ``build -c`` reads it
back. Everything that influences the result lives here, so the manifest can record it whole.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgeexport.errors import ConfigError
from edgeexport.targets import DEFAULT_TARGET

CALIB_METHODS = ("auto", "minmax", "entropy", "percentile")
DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")
_NAME = re.compile(r"^[^\x00-\x1f]+$")
_DIM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Default tolerances per precision. Metrics: mean cosine similarity (>=), SNR in dB (>=), top-1 agreement with
# the reference for classifier-like outputs (>=), drop in task accuracy in percentage points when labels exist
# (<=). See docs/validation.md.
# Probability outputs (see OUTPUT_KINDS) are held to a mean absolute error and to the share of thresholded decisions
# that flip, not to cosine/SNR: a one-element output's cosine is always 1.
DEFAULT_TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"cosine": 0.9999, "snr_db": 40.0, "top1": 0.99, "accuracy_drop": 0.5, "prob_mean_abs": 1e-4,
             "flip_rate": 0.01},
    "fp16": {"cosine": 0.999, "snr_db": 30.0, "top1": 0.95, "accuracy_drop": 0.5, "prob_mean_abs": 2e-3,
             "flip_rate": 0.01},
    "int8-dynamic": {"cosine": 0.98, "snr_db": 12.0, "top1": 0.95, "accuracy_drop": 1.0, "prob_mean_abs": 0.02,
                     "flip_rate": 0.03},
    "dynamic-range": {"cosine": 0.98, "snr_db": 12.0, "top1": 0.95, "accuracy_drop": 1.0, "prob_mean_abs": 0.02,
                      "flip_rate": 0.03},
    "int8": {"cosine": 0.98, "snr_db": 12.0, "top1": 0.95, "accuracy_drop": 1.0, "prob_mean_abs": 0.02,
             "flip_rate": 0.03},
    "int8-weight": {"cosine": 0.99, "snr_db": 20.0, "top1": 0.97, "accuracy_drop": 0.5, "prob_mean_abs": 0.01,
                    "flip_rate": 0.02},
    "int4-weight": {"cosine": 0.98, "snr_db": 12.0, "top1": 0.95, "accuracy_drop": 1.0, "prob_mean_abs": 0.02,
                    "flip_rate": 0.03},
}
#: decoders (--task text-generation) are judged on what generation depends on, teacher-forced on held-out text
#: against PyTorch: next-token top-1 agreement where the reference's choice is decisive (its top token leads the
#: runner-up by >= 0.02 in probability; at near-ties any rounding flips the choice and neither is wrong), the mean
#: KL divergence of the next-token distributions (nats per token), and the relative change of perplexity. See
#: docs/decoders.md
DECODER_TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"next_token_top1": 0.999, "kl_divergence": 1e-4, "perplexity_change": 0.001},
    "fp16": {"next_token_top1": 0.995, "kl_divergence": 1e-3, "perplexity_change": 0.01},
    "int8-weight": {"next_token_top1": 0.99, "kl_divergence": 5e-3, "perplexity_change": 0.01},
    "int8-dynamic": {"next_token_top1": 0.95, "kl_divergence": 0.05, "perplexity_change": 0.05},
    "int4-weight": {"next_token_top1": 0.95, "kl_divergence": 0.05, "perplexity_change": 0.05},
}
#: what an output is, which decides its metrics (docs/validation.md): inferred from shape and values where that is
#: safe, or declared with --output NAME:KIND
OUTPUT_KINDS = {
    "logits": "class scores [batch, classes]: cosine, SNR, top-1 agreement (and task accuracy with labels)",
    "probability": "values in [0, 1] (sigmoid or softmax): mean absolute error and the share of decisions at 0.5 "
                   "that flip (top-1 agreement for softmax rows)",
    "embedding": "a vector compared by direction (sentence or speaker embedding, token states): cosine and SNR, "
                 "no top-1",
    "regression": "numbers compared by value (boxes, scores, a single value): SNR and max/mean absolute error; "
                  "cosine only with more than one value per sample",
    "state": "recurrent state fed back as an input (--state): judged by what it does to the other outputs when "
             "the held-out data is streamed, reported but not checked itself",
}
#: A pruned model is a different function from the original it is validated against: it is held to the looser of
#: its precision's limits and these (agreement on the task, not bit-for-bit closeness). See docs/pruning.md.
PRUNED_TOLERANCES: dict[str, float] = {"cosine": 0.95, "snr_db": 10.0, "top1": 0.95, "accuracy_drop": 1.0}
PRUNE_METHODS = ("structured", "magnitude")
#: --accuracy-budget metrics: the validation check each one sets, and whether it is a floor (min) or a ceiling (max)
BUDGET_METRICS = {"cosine": "min", "top1": "min", "snr_db": "min", "pooled_cosine": "min", "accuracy_drop": "max"}
#: the values each tolerance (and accuracy budget) may take: (lowest, highest)
TOLERANCE_RANGES: dict[str, tuple[float, float]] = {
    "cosine": (-1.0, 1.0), "pooled_cosine": (-1.0, 1.0), "top1": (0.0, 1.0), "top5": (0.0, 1.0),
    "snr_db": (-200.0, 200.0), "accuracy_drop": (0.0, 100.0), "max_abs": (0.0, float("inf")),
    "prob_mean_abs": (0.0, 1.0), "flip_rate": (0.0, 1.0), "next_token_top1": (0.0, 1.0),
    "perplexity_change": (0.0, 100.0), "kl_divergence": (0.0, 100.0),
}
TOLERANCE_KEYS = {
    "cosine": "min mean cosine similarity",
    "snr_db": "min signal-to-noise ratio in dB",
    "top1": "min top-1 agreement with the reference (classifier-like outputs)",
    "pooled_cosine": "min mean cosine of mean-pooled token embeddings (encoders; off unless set)",
    "top5": "min share of samples whose reference top-1 is in the built model's top-5 (off unless set)",
    "accuracy_drop": "max drop in task accuracy, percentage points (needs labels)",
    "max_abs": "max absolute error (off unless set)",
    "prob_mean_abs": "max mean absolute error of probability outputs",
    "flip_rate": "max share of a probability output's decisions (at 0.5) that flip",
    "next_token_top1": "min teacher-forced next-token top-1 agreement on held-out text where the reference's choice "
                       "is decisive (--task text-generation)",
    "kl_divergence": "max mean KL divergence of the next-token distributions, nats per token (--task "
                     "text-generation)",
    "perplexity_change": "max relative increase of held-out perplexity, 0.05 = 5% (--task text-generation)",
}


def check_limit(what: str, key: str, value: float) -> None:
    """A tolerance or budget value must be a number its metric can take (cosine 1.5, NaN or top1=95 never holds
    or always holds: either way the gate would mean nothing)."""
    lo, hi = TOLERANCE_RANGES[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not lo <= value <= hi:
        hint = ""
        if key in ("top1", "top5") and isinstance(value, (int, float)) and 1 < value <= 100:
            hint = f" (a fraction, not a percentage: did you mean {value / 100:g}?)"
        raise ValueError(f"{what} {key}={value!r} is out of range: {key} takes values from {lo:g} to {hi:g}{hint}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(_Strict):
    """One model input: name, shape (ints, or names for dynamic dims), dtype."""

    name: str
    shape: list[Union[int, str]]
    dtype: str = "float32"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"input name {v!r} must be non-empty printable text")
        return v

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: list[Union[int, str]]) -> list[Union[int, str]]:
        for d in v:
            if isinstance(d, int) and d <= 0:
                raise ValueError(f"dimension {d} must be a positive integer or a name such as 'batch'")
            if isinstance(d, str) and not _DIM_NAME.match(d):
                raise ValueError(f"dynamic dimension name {d!r} must be an identifier such as 'batch'")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"dtype {v!r} is not one of {', '.join(DTYPES)}")
        return v

    @property
    def dynamic_dims(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def describe(self) -> str:
        return f"{self.name}:{'x'.join(str(d) for d in self.shape)}:{self.dtype}"


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``name:1x3x224x224:float32`` (dtype optional; dims may be names such as ``batch``; ``sr::int64`` is a
    scalar)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or (not parts[1] and len(parts) == 2):
        raise ConfigError(
            f"cannot parse --input {text!r}",
            "expected NAME:SHAPE[:DTYPE] with SHAPE like 1x3x224x224 or batchx3x224x224, or an empty SHAPE for a "
            "scalar (NAME::DTYPE)",
            "for example --input image:batchx3x224x224:float32 or --input sr::int64",
        )
    # an empty SHAPE is a scalar (rank 0), as describe() prints it
    dims: list[Union[int, str]] = [int(d) if d.isdigit() else d for d in parts[1].split("x")] if parts[1] else []
    try:
        return InputSpec(name=parts[0], shape=dims, dtype=parts[2] if len(parts) == 3 else "float32")
    except ValidationError as e:
        raise ConfigError(f"invalid --input {text!r}", _first_error(e), "see 'edgeexport build --help'") from None


class ImagePreprocess(_Strict):
    """How a folder of images becomes model input. Stored in the manifest so the device does the same."""

    size: Optional[list[int]] = None  # [H, W] the model sees; default: taken from the input shape
    resize_shorter: Optional[int] = Field(default=None, ge=1)  # resize the shorter side to this, then center-crop
    color: Literal["rgb", "bgr", "gray"] = "rgb"
    scale: float = 1.0 / 255.0
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    layout: Literal["nchw", "nhwc"] = "nchw"

    @field_validator("std")
    @classmethod
    def _std(cls, v: list[float]) -> list[float]:
        if any(s == 0 or not math.isfinite(s) for s in v):
            raise ValueError("std values must be finite and non-zero")
        return v

    @field_validator("mean")
    @classmethod
    def _mean(cls, v: list[float]) -> list[float]:
        if not all(math.isfinite(m) for m in v):
            raise ValueError("mean values must be finite numbers")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is not None and (len(v) != 2 or any(d < 1 for d in v)):
            raise ValueError(f"image size {v} must be two positive integers [H, W], e.g. 224x224")
        return v

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: float) -> float:
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"scale {v} must be a positive number, e.g. 0.00392 (1/255)")
        return v


class CalibrationConfig(_Strict):
    path: Optional[str] = None  # .npz/.npy, an image folder or glob, or 'synthetic:N'
    validation_path: Optional[str] = None  # separate held-out data; default: split off `path`
    samples: Optional[int] = Field(default=None, ge=1)  # calibration samples (default: all but the holdout, <=256)
    holdout: Optional[int] = Field(default=None, ge=1)  # held-out validation samples (default: 20%, <=200)
    #: the fewest held-out samples a build accepts: with fewer, one sample moves an agreement by > 10 points
    min_holdout: int = Field(default=10, ge=1)
    method: Literal["auto", "minmax", "entropy", "percentile"] = "auto"  # auto: recipes.calib_method
    percentile: float = Field(default=99.999, gt=50.0, le=100.0)
    seed: int = 0
    max_length: int = Field(default=128, ge=1, le=8192)  # text: tokens per sample (truncate, pad to this length)
    labels: Optional[str] = None
    preprocess: Optional[ImagePreprocess] = None

    @model_validator(mode="after")
    def _preprocess_needs_images(self) -> "CalibrationConfig":
        arrays = [p for p in (self.path, self.validation_path)
                  if p and (p.lower().endswith((".npz", ".npy")) or p.startswith("synthetic:"))]
        if self.preprocess is not None and arrays:
            given = sorted(k for k in self.preprocess.model_fields_set)
            raise ValueError(f"image preprocessing ({', '.join('--' + g.replace('_', '-') for g in given) or 'preprocess'}) "
                             f"applies to image folders only; {arrays[0]!r} holds arrays, fed as they are "
                             "(preprocess them before saving, or point --calib at the images)")
        return self


class BenchConfig(_Strict):
    enabled: bool = True
    warmup: int = Field(default=5, ge=0)
    runs: int = Field(default=50, ge=1)
    threads: Optional[int] = Field(default=None, ge=1)


class PruneConfig(_Strict):
    """Pruning before export (``--prune structured:0.3``), then an optional short recovery."""

    method: Literal["structured", "magnitude"]
    amount: float = Field(gt=0.0, lt=1.0)  # structured: share of channels removed per layer; magnitude: of weights
    finetune_steps: int = Field(default=0, ge=0)  # recovery steps on the calibration split (never the holdout)
    finetune_lr: float = Field(default=1e-3, gt=0.0, le=1.0)
    finetune_batch: int = Field(default=32, ge=1)


def parse_prune(text: str) -> dict[str, Any]:
    """``structured:0.3`` / ``magnitude:0.5`` -> PruneConfig fields."""
    method, sep, amount = text.partition(":")
    try:
        value = float(amount)
    except ValueError:
        value = None
    if not sep or method not in PRUNE_METHODS or value is None or not 0.0 < value < 1.0:
        raise ConfigError(f"cannot parse --prune {text!r}",
                          f"expected METHOD:AMOUNT with METHOD one of {', '.join(PRUNE_METHODS)} and 0 < AMOUNT < 1",
                          "e.g. --prune structured:0.3 (remove 30% of channels) or --prune magnitude:0.5")
    return {"method": method, "amount": value}


class BuildConfig(_Strict):
    """Everything that determines one build."""

    target: str = DEFAULT_TARGET
    precision: str = "int8"  # the CLI's default too: a config file without it builds what the CLI would
    model: str
    task: Optional[str] = None  # hf: the optimum task (default feature-extraction); also selects metrics
    inputs: list[InputSpec] = Field(default_factory=list)
    opset: int = Field(default=18, ge=13, le=23)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    tolerance: dict[str, float] = Field(default_factory=dict)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    golden_samples: int = Field(default=3, ge=1, le=32)
    out: str = "bundle"
    force: bool = False
    target_options: dict[str, Any] = Field(default_factory=dict)
    #: int8: keep the layers that add the most error in float until this metric holds, e.g. {"cosine": 0.995}
    accuracy_budget: dict[str, float] = Field(default_factory=dict)
    budget_steps: int = Field(default=8, ge=1, le=32)  # most re-quantize/re-validate rounds of that search
    explain: bool = False  # int8: rank layers by the error they add, print the top ones, record them
    diagnose: bool = True  # int8 refused by the gate: build a few alternatives and say what each measured
    archive: Optional[str] = None  # also pack the bundle as <out>.tar.gz or <out>.zip
    prune: Optional[PruneConfig] = None  # prune the PyTorch model before export (validated against the original)
    #: what each output is (--output NAME:KIND); outputs not named are inferred from their shape and values
    outputs: dict[str, str] = Field(default_factory=dict)
    #: recurrent state pairs (--state IN=OUT): OUT of one call is IN of the next; validated by streaming
    state: dict[str, str] = Field(default_factory=dict)

    @field_validator("archive")
    @classmethod
    def _archive(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v not in ("tar.gz", "zip"):
            raise ValueError(f"archive {v!r} is not tar.gz or zip")
        return v

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, v: dict[str, str]) -> dict[str, str]:
        for name, kind in v.items():
            if kind not in OUTPUT_KINDS:
                raise ValueError(f"output kind {kind!r} (for {name!r}) is not one of {', '.join(OUTPUT_KINDS)}")
        return v

    @field_validator("accuracy_budget")
    @classmethod
    def _budget(cls, v: dict[str, float]) -> dict[str, float]:
        if len(v) > 1:
            raise ValueError(f"one accuracy budget at a time, got {sorted(v)}")
        for k in v:
            if k not in BUDGET_METRICS:
                raise ValueError(f"unknown accuracy budget metric {k!r}; known: {', '.join(BUDGET_METRICS)}")
            check_limit("accuracy budget", k, v[k])
        return v

    @field_validator("precision")
    @classmethod
    def _precision(cls, v: str) -> str:
        from edgeexport.targets import known_precisions

        if v not in known_precisions():  # the union of every target's own list (each target checks its own)
            raise ValueError(f"precision {v!r} is not one of {', '.join(known_precisions())}")
        return v

    @field_validator("tolerance")
    @classmethod
    def _tolerance(cls, v: dict[str, float]) -> dict[str, float]:
        for k, value in v.items():
            if k not in TOLERANCE_KEYS:
                raise ValueError(f"unknown tolerance {k!r}; known: {', '.join(TOLERANCE_KEYS)}")
            check_limit("tolerance", k, value)
        return v

    @model_validator(mode="after")
    def _unique_inputs(self) -> "BuildConfig":
        names = [i.name for i in self.inputs]
        if len(names) != len(set(names)):
            raise ValueError(f"input names must be unique, got {names}")
        return self

    def resolved_tolerance(self) -> dict[str, float]:
        """Per-precision defaults overlaid with the user's overrides, then the accuracy budget (the limit the user
        asked the build to reach is also the limit it is validated against)."""
        merged = dict(DEFAULT_TOLERANCES[self.precision])
        if self.prune is not None:
            for key, limit in PRUNED_TOLERANCES.items():
                merged[key] = max(merged[key], limit) if key == "accuracy_drop" else min(merged[key], limit)
        merged.update(self.tolerance)
        merged.update(self.accuracy_budget)
        return merged

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_tolerance(items: tuple[str, ...] | list[str]) -> dict[str, float]:
    """Parse ``--tolerance cosine=0.995`` (repeatable, or comma-separated)."""
    out: dict[str, float] = {}
    for item in items:
        for part in filter(None, item.split(",")):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in TOLERANCE_KEYS:
                raise ConfigError(
                    f"cannot parse --tolerance {part!r}",
                    f"expected KEY=VALUE with KEY one of {', '.join(TOLERANCE_KEYS)}",
                    "for example --tolerance cosine=0.995 --tolerance top1=0.97",
                )
            try:
                out[key.strip()] = float(value)
            except ValueError:
                raise ConfigError(f"tolerance {key}={value!r} is not a number", "", "use e.g. cosine=0.995") from None
    return out


def parse_pairs(items: tuple[str, ...] | list[str], flag: str, sep: str, example: str) -> dict[str, str]:
    """``--output NAME:KIND`` / ``--state IN=OUT`` (repeatable, or comma-separated) as a dict."""
    out: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            key, found, value = part.strip().rpartition(sep)
            if not found or not key or not value:
                raise ConfigError(f"cannot parse {flag} {part!r}", f"expected {example}", f"for example {flag} {example}")
            out[key] = value
    return out


def make_config(data: dict[str, Any], source: str = "options") -> BuildConfig:
    """Validate a dict into a BuildConfig, turning pydantic's errors into a ConfigError."""
    try:
        return BuildConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid build configuration ({source})", _first_error(e), "fix the value named above") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found", "", "pass the YAML written by 'edgeexport build --dry-run'")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML", str(e).splitlines()[0], "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping", f"found {type(data).__name__}",
                          "write KEY: VALUE lines, as 'edgeexport build ... --dry-run' prints them")
    return data


def _first_error(e: ValidationError) -> str:
    errs = e.errors()
    parts = []
    for err in errs[:3]:
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)
