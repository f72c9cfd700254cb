"""Readers for calibration sources: .npz/.npy arrays, folders of images, and explicit synthetic data."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from edgeexport.calibration.store import Decoded, RawData, InMemory, check_magic, open_npy, open_npz, pickled
from edgeexport.config import CalibrationConfig, ImagePreprocess, InputSpec
from edgeexport.errors import CalibrationError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
LABELS_KEY = "labels"
#: stateful models: a boolean per sample, True where a new stream (a recording, a sequence) starts
STREAM_KEY = "stream_start"
_SYNTHETIC = re.compile(r"^synthetic:(\d+)$")


def read_source(cfg: CalibrationConfig, specs: list[InputSpec], tokenizer: Optional[Path] = None) -> RawData:
    if not cfg.path:
        raise CalibrationError(
            "no calibration data given",
            "edgeexport validates every build on real held-out inputs and never falls back to random data",
            "pass --calib data.npz (arrays keyed by input name) or --calib images/; "
            "to accept random data knowingly, pass --calib synthetic:64",
        )
    return read_path(cfg.path, cfg, specs, tokenizer)


def read_path(path_text: str, cfg: CalibrationConfig, specs: list[InputSpec], tokenizer: Optional[Path] = None) -> RawData:
    """One source: synthetic:N, a glob of images, a folder of images, an .npz or an .npy (+ --labels)."""
    m = _SYNTHETIC.match(path_text)
    if m:
        raw = synthetic(specs, int(m.group(1)), cfg.seed)
    elif any(ch in path_text for ch in "*?["):
        import glob

        files = sorted(Path(f) for f in glob.glob(path_text, recursive=True)
                       if Path(f).is_file() and Path(f).suffix.lower() in IMAGE_EXTS)
        raw = read_images(files, path_text, specs, cfg.preprocess or ImagePreprocess())
    else:
        path = Path(path_text)
        if not path.exists():
            raise CalibrationError(f"calibration path {str(path)!r} does not exist", "", "check the --calib path")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
            arrays = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".npz", ".npy"))
            if not files and arrays:
                raise CalibrationError(f"{str(path)!r} is a folder of array files ({', '.join(arrays[:3])}"
                                       f"{', ...' if len(arrays) > 3 else ''}), not of images",
                                       "a folder is read as images; arrays come from one .npz or .npy file",
                                       f"pass one file (--calib {path / arrays[0]}), or np.savez the samples "
                                       "together into one .npz keyed by input name")
            raw = read_images(files, str(path), specs, cfg.preprocess or ImagePreprocess())
        elif path.suffix == ".npz":
            raw = read_npz(path, specs)
        elif path.suffix == ".npy":
            raw = read_npy(path, specs)
        elif path.suffix == ".txt":
            raw = read_text(path, specs, tokenizer, text_length(specs, cfg))
        else:
            raise CalibrationError(
                f"cannot read calibration data from {str(path)!r}",
                f"unsupported file type {path.suffix or '(none)'!r}",
                "use an .npz (arrays keyed by input name), an .npy (single-input models), a folder of images, "
                "or a .txt with one text sample per line (models with a tokenizer)",
            )
    if cfg.labels:
        raw.labels = read_labels(Path(cfg.labels))
    return raw


def _np_load(path: Path):
    check_magic(path)
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise pickled(str(path)) from None
        raise CalibrationError(f"cannot read {str(path)!r}", str(e), "re-save it with numpy") from None
    except (OSError, EOFError) as e:
        raise CalibrationError(f"cannot read {str(path)!r}", str(e) or "the file is truncated or not numpy data",
                               "re-save it with np.savez / np.save") from None


def read_npz(path: Path, specs: list[InputSpec]) -> RawData:
    arrays = open_npz(path)
    labels = None
    notes = []
    if LABELS_KEY in arrays and LABELS_KEY not in {s.name for s in specs}:
        stored = arrays.pop(LABELS_KEY)
        labels = check_labels(stored.rows(0, len(stored)), f"the '{LABELS_KEY}' array of {str(path)!r}")
        notes.append(f"labels taken from the '{LABELS_KEY}' array of {path.name}")
    starts = None
    if STREAM_KEY in arrays and STREAM_KEY not in {s.name for s in specs}:
        stored = arrays.pop(STREAM_KEY)
        starts = stored.rows(0, len(stored))
        if starts.ndim != 1 or starts.dtype.kind not in "biu" or not np.isin(starts, (0, 1)).all():
            raise CalibrationError(f"the '{STREAM_KEY}' array of {str(path)!r} is not one flag per sample",
                                   f"it is {starts.dtype} {list(starts.shape)}",
                                   "save a boolean array of shape [N], True at the first chunk of each stream")
        starts = starts.astype(bool)
        notes.append(f"{int(starts.sum())} stream start(s) taken from the '{STREAM_KEY}' array of {path.name}")
    if not arrays:
        raise CalibrationError(f"{str(path)!r} holds no input arrays", "", "save one array per model input")
    return RawData(arrays, labels, "npz", str(path), notes=notes, stream_start=starts)


def read_npy(path: Path, specs: list[InputSpec]) -> RawData:
    if len(specs) != 1:
        raise CalibrationError(
            f"an .npy file holds one array but the model has {len(specs)} inputs",
            "arrays are matched to inputs by name",
            "save an .npz with one array per input: np.savez(path, " + ", ".join(f"{s.name}=..." for s in specs) + ")",
        )
    return RawData({specs[0].name: open_npy(path)}, None, "npy", str(path))


def read_labels(path: Path) -> np.ndarray:
    if not path.is_file():
        raise CalibrationError(f"labels file {str(path)!r} not found", "", "check the --labels path")
    if path.suffix == ".npy":
        labels = _np_load(path)
    elif path.suffix == ".npz":
        with _np_load(path) as z:
            if LABELS_KEY not in z.files:
                raise CalibrationError(f"{str(path)!r} has no '{LABELS_KEY}' array", f"it has {z.files}", "")
            labels = z[LABELS_KEY]
    else:
        try:
            labels = np.array([int(x) for x in path.read_text().split()])
        except ValueError:
            raise CalibrationError(f"labels file {str(path)!r} is not one integer per line", "", "") from None
    return check_labels(labels, repr(str(path)))


def check_labels(labels: np.ndarray, where: str) -> np.ndarray:
    """Class indices, one per sample. A one-hot ``(N, classes)`` array becomes its indices; float, negative or
    multi-dimensional labels are refused (accuracy against them would mean nothing)."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] > 1 and labels.size and np.isin(labels, (0, 1)).all() \
            and (labels.sum(axis=1) == 1).all():
        return labels.argmax(axis=1).astype(np.int64)  # one-hot rows
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        kind = ("floats" if labels.dtype.kind == "f" else f"{labels.dtype}") + f" of shape {list(labels.shape)}"
        raise CalibrationError(f"labels in {where} must be class indices: a 1-D integer array (or one-hot rows)",
                               f"got {kind}",
                               "save the class index of each sample, e.g. np.save('labels.npy', y.astype(np.int64))"
                               + ("; regression targets are not labels (drop --labels)" if labels.dtype.kind == "f"
                                  else ""))
    if labels.size and labels.min() < 0:
        raise CalibrationError(f"labels in {where} hold a negative class index ({int(labels.min())})", "",
                               "class indices start at 0")
    return labels.astype(np.int64)


def text_length(specs: list[InputSpec], cfg: Any) -> int:
    """Tokens per text sample: ``max_length`` when given; else the sequence length the inputs declare (all the
    same static last dimension, e.g. ``--input input_ids:1x32:int64``); else the default."""
    if "max_length" in cfg.model_fields_set:
        return int(cfg.max_length)
    lengths = {s.shape[-1] for s in specs if s.shape}
    only = next(iter(lengths)) if len(lengths) == 1 else None
    return only if isinstance(only, int) and only > 0 else int(cfg.max_length)


def read_text(path: Path, specs: list[InputSpec], tokenizer: Optional[Path], max_length: int) -> RawData:
    """One sample per non-empty line, tokenized with the model's own tokenizer (``tokenizers`` package),
    truncated and padded to ``max_length``; the same settings go to the device's loader."""
    if tokenizer is None:
        raise CalibrationError(f"{str(path)!r} is text but the model has no tokenizer",
                               "text calibration needs the model's tokenizer.json (hf:PATH models carry one)",
                               "tokenize the text yourself and pass an .npz keyed by input name")
    from edgeexport.bundle.loader import InputError, encode_texts, make_tokenizer, text_settings

    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{str(path)!r} is not UTF-8 text", str(e), "save it as UTF-8") from None
    texts = [ln for ln in lines if ln]
    if not texts:
        raise CalibrationError(f"{str(path)!r} has no non-empty lines", "", "put one text sample per line")
    settings = text_settings(max_length)
    try:
        arrays, encodings = encode_texts(make_tokenizer(tokenizer, settings), texts,
                                         [{"name": s.name, "dtype": s.dtype} for s in specs])
    except InputError as e:
        raise CalibrationError(str(e), "", "pass an .npz keyed by input name") from None
    truncated = sum(1 for e in encodings if e.overflowing)
    notes = [f"{len(lines) - len(texts)} empty line(s) skipped"] if len(lines) != len(texts) else []
    if truncated:
        notes.append(f"{truncated} of {len(texts)} text samples were truncated to {max_length} tokens")
    return RawData({k: InMemory(v) for k, v in arrays.items()}, None, "text", str(path), notes=notes, text=settings)


def synthetic(specs: list[InputSpec], n: int, seed: int) -> RawData:
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in specs:
        shape = []
        for i, d in enumerate(spec.shape):
            if isinstance(d, int):
                shape.append(d)
            elif i == 0:
                shape.append(1)
            else:
                raise CalibrationError(
                    f"cannot make synthetic data for {spec.name!r}: dimension {i} ({d!r}) has no size",
                    "synthetic data needs concrete shapes",
                    f"declare it with --input {spec.name}:<shape with numbers>:{spec.dtype}",
                )
        shape = [n] + shape[1:]
        if spec.dtype.startswith("float"):
            arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == "bool":
            arrays[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            arrays[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
    return RawData({k: InMemory(v) for k, v in arrays.items()}, None, "synthetic", f"synthetic:{n}", synthetic=True,
                   notes=["SYNTHETIC random data: calibration ranges and validation metrics do not reflect real inputs"])


def _image_spec(specs: list[InputSpec], pre: ImagePreprocess) -> tuple[InputSpec, int, int, int]:
    if len(specs) != 1 or len(specs[0].shape) != 4:
        raise CalibrationError(
            "a folder of images can only feed a model with one 4-D image input",
            f"the model's inputs are {[s.describe() for s in specs]}",
            "save the inputs as an .npz keyed by input name instead",
        )
    spec = specs[0]
    if not spec.dtype.startswith("float"):
        raise CalibrationError(f"input {spec.name!r} is {spec.dtype}; images are preprocessed to float",
                               "", "save integer image inputs as an .npz instead")
    c_axis, h_axis, w_axis = (1, 2, 3) if pre.layout == "nchw" else (3, 1, 2)
    channels = spec.shape[c_axis]
    want_c = 1 if pre.color == "gray" else 3
    if isinstance(channels, int) and channels != want_c:
        raise CalibrationError(
            f"input {spec.name!r} has {channels} channel(s) at axis {c_axis} ({pre.layout.upper()}) "
            f"but color mode {pre.color!r} gives {want_c}",
            "",
            "set --color gray for 1-channel models, rgb/bgr for 3, and --layout to match the model",
        )
    if pre.size:
        h, w = pre.size
    else:
        sh, sw = spec.shape[h_axis], spec.shape[w_axis]
        if not (isinstance(sh, int) and isinstance(sw, int)):
            raise CalibrationError(
                f"input {spec.name!r} has dynamic height/width {spec.shape}",
                "images must be resized to a known size",
                "pass --image-size HxW",
            )
        h, w = sh, sw
    return spec, want_c, h, w


def preprocess_image(img, pre: ImagePreprocess, h: int, w: int) -> np.ndarray:
    """PIL image -> float32 array; the bundle's loader does the very same on the device (one implementation)."""
    from edgeexport.bundle.loader import preprocess_image as shared

    c = 1 if pre.color == "gray" else 3
    spec = pre.model_copy(update={"size": [h, w],
                                  "mean": pre.mean if len(pre.mean) == c else pre.mean * c,
                                  "std": pre.std if len(pre.std) == c else pre.std * c})
    return shared(img, spec.model_dump())


def read_images(files: list[Path], where: str, specs: list[InputSpec], pre: ImagePreprocess) -> RawData:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - pillow is a core dependency
        from edgeexport.errors import missing_extra

        raise missing_extra("pillow", "dev", "reading image folders") from None
    spec, channels, h, w = _image_spec(specs, pre)
    for name, values in (("mean", pre.mean), ("std", pre.std)):
        if len(values) not in (1, channels):
            raise CalibrationError(f"--{name} has {len(values)} values for {channels} channel(s)", "", f"give 1 or {channels} values")
    if not files:
        raise CalibrationError(
            f"no images found in {where!r}",
            f"looked for files ending in {', '.join(sorted(IMAGE_EXTS))}",
            "point --calib at a folder of real input images",
        )

    def decode(f: Path) -> np.ndarray:
        try:
            with Image.open(f) as img:
                img.load()
                return preprocess_image(img, pre, h, w).astype(spec.dtype)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise CalibrationError(
                f"cannot decode image {str(f)!r}", str(e) or type(e).__name__, "remove or replace the corrupt file"
            ) from None

    resolved = pre.model_copy(update={"size": [h, w]}).model_dump()
    # decoded when read; the checks that follow decode every file once, so a corrupt one fails the build up front
    return RawData({spec.name: Decoded(files, decode)}, None, "images", where, preprocess=resolved,
                   files=[str(f) for f in files])
