#!/usr/bin/env python3
"""edgeexport bundle loader: one file, needs only numpy and the target runtime (never torch).

    from loader import load
    model = load("path/to/bundle")          # verifies checksums and versions first
    outputs = model({"image": x})            # dict in, dict out (a single array is fine for one-input models)

    python loader.py --selftest              # runs the golden input/output pairs; exit 0 = pass

TensorRT bundles check the TensorRT version and the GPU first, then use the bundle's engine if it fits this device,
or build one from the bundle's ONNX on first load and cache it beside the bundle (``<bundle>.engines/``).

This file is copied into every bundle unchanged. It never unpickles and never executes code from the bundle.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 1
_REQUIRED = ("schema_version", "target", "precision", "model_file", "files", "inputs", "outputs", "runtime", "golden")
_FIELD_TYPES = (("target", str, "a string"), ("precision", str, "a string"), ("model_file", str, "a string"),
                ("files", list, "a list"), ("inputs", list, "a list"), ("outputs", list, "a list"),
                ("runtime", dict, "an object"), ("golden", dict, "an object"))
_MAX_MANIFEST_BYTES = 16 << 20


class BundleError(Exception):
    """The bundle is missing, malformed, tampered with, or does not fit this device."""


class InputError(ValueError):
    """Inputs that do not match the model's names, shapes or dtypes."""


def _sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def _safe_path(root, rel):
    """Resolve ``rel`` inside ``root``; refuse absolute paths, '..', and links that leave the folder."""
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or "\\" in rel or ":" in rel:
        raise BundleError(f"manifest lists an unsafe path {rel!r}")
    if any(part in ("..", "") for part in rel.split("/")):
        raise BundleError(f"manifest lists a path that escapes the bundle: {rel!r}")
    path = root / rel
    if os.path.islink(path) or not str(path.resolve()).startswith(str(root.resolve()) + os.sep):
        raise BundleError(f"{rel!r} is a link or leaves the bundle folder")
    return path


ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")
_MAX_ARCHIVE_MEMBERS = 10_000
_MAX_ARCHIVE_BYTES = 16 << 30  # uncompressed, all members together
_MAX_RATIO = 200  # uncompressed / compressed: model files compress 1-10x; a deflate bomb reaches ~1000x


def is_archive(path):
    return str(path).lower().endswith(ARCHIVE_SUFFIXES) and Path(path).is_file()


def _member_path(name):
    """An archive member's name as a safe relative path, or a BundleError."""
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or "\\" in name or ":" in name \
            or "\x00" in name:
        raise BundleError(f"archive member {name!r} has an unsafe name (absolute, drive, backslash or NUL)")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise BundleError(f"archive member {name!r} escapes the bundle folder")
    return "/".join(parts)


def _copy_limited(src, dst_path, budget):
    """Copy a member's stream to ``dst_path``, counting real bytes against ``budget`` (not the header's claim)."""
    written = 0
    with open(dst_path, "xb") as dst:
        while True:
            block = src.read(1 << 20)
            if not block:
                return written
            written += len(block)
            if written > budget:
                raise BundleError("archive expands past the size limit: refusing it "
                                  f"({_MAX_ARCHIVE_BYTES >> 30} GiB, ratio {_MAX_RATIO}x)")
            dst.write(block)


def _archive_members(path):
    """(name, kind, declared size, opener) for each member; kind is 'file', 'dir' or what else it is."""
    import tarfile
    import zipfile

    if str(path).lower().endswith(".zip"):
        try:
            zf = zipfile.ZipFile(path)
            infos = zf.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise BundleError(f"{path} is not a readable zip archive: {e}") from None
        out = []
        for info in infos:
            mode = (info.external_attr >> 16) & 0o170000
            kind = "dir" if info.filename.endswith("/") else ("link" if mode == 0o120000 else
                                                 "file" if mode in (0, 0o100000) else "special")
            out.append((info.filename, kind, info.file_size, lambda i=info: zf.open(i)))
        return out, zf
    try:
        tf = tarfile.open(path, "r:*")
        members = tf.getmembers()
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        raise BundleError(f"{path} is not a readable tar archive: {e}") from None
    out = []
    for m in members:
        kind = "file" if m.isreg() else "dir" if m.isdir() else "link" if (m.issym() or m.islnk()) else "special"
        out.append((m.name, kind, m.size, lambda m=m: tf.extractfile(m)))
    return out, tf


def open_archive(path, dest):
    """Extract a bundle archive (.tar.gz/.tgz/.zip) into the empty folder ``dest`` and return the bundle folder.

    Only regular files and folders are accepted: members that escape the folder, links, devices, duplicates, too
    many members or too many bytes (counted while extracting, not taken from headers) are refused before anything
    is used. Nothing in the archive is executed, and this loader never unpickles."""
    path, dest = Path(path), Path(dest)
    compressed = max(path.stat().st_size, 1)
    budget = min(_MAX_ARCHIVE_BYTES, compressed * _MAX_RATIO)
    members, handle = _archive_members(path)
    try:
        if len(members) > _MAX_ARCHIVE_MEMBERS:
            raise BundleError(f"archive has {len(members)} members (limit {_MAX_ARCHIVE_MEMBERS})")
        seen = set()
        plan = []
        for name, kind, size, opener in members:
            rel = _member_path(name)
            if kind not in ("file", "dir"):
                raise BundleError(f"archive member {name!r} is a {kind}: only regular files and folders are accepted")
            if rel in seen:
                raise BundleError(f"archive member {name!r} appears twice")
            seen.add(rel)
            if kind == "file" and (not isinstance(size, int) or size < 0 or size > budget):
                raise BundleError(f"archive member {name!r} declares {size} bytes: past the size limit")
            plan.append((rel, kind, opener))
        for rel, kind, opener in plan:
            target = dest / rel
            try:
                if kind == "dir":
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists():
                    raise BundleError(f"archive member {rel!r} collides with a folder or another member")
                with opener() as src:
                    budget -= _copy_limited(src, target, budget)
            except BundleError:
                raise
            except (OSError, EOFError, ValueError, RuntimeError, NotImplementedError, LookupError) as e:
                # corrupt streams (zlib, CRC, truncation), unsupported or encrypted members, path clashes
                raise BundleError(f"archive member {rel!r} cannot be extracted: {type(e).__name__}: {e}") from None
            except Exception as e:  # tarfile/zipfile's own error classes (not OSError subclasses)
                if type(e).__module__ in ("tarfile", "zipfile", "zlib", "gzip"):
                    raise BundleError(f"archive member {rel!r} is corrupt: {type(e).__name__}: {e}") from None
                raise
    finally:
        handle.close()
    tops = {rel.split("/")[0] for rel, _, _ in plan}
    if not (dest / "manifest.json").is_file() and len(tops) == 1 and (dest / next(iter(tops)) / "manifest.json").is_file():
        return dest / next(iter(tops))
    return dest


def extract_archive(path):
    """Extract a bundle archive into a new private temporary folder (removed at exit); return the bundle folder."""
    import atexit
    import shutil
    import tempfile

    dest = Path(tempfile.mkdtemp(prefix=f"edgeexport-{os.getpid()}-bundle-"))
    atexit.register(shutil.rmtree, dest, ignore_errors=True)
    try:
        return open_archive(path, dest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def read_manifest(root):
    root = Path(root)
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise BundleError(f"{root} is not an edgeexport bundle: manifest.json is missing")
    if mpath.stat().st_size > _MAX_MANIFEST_BYTES:
        raise BundleError("manifest.json is implausibly large")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"manifest.json is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise BundleError("manifest.json must hold a JSON object")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"manifest.json lacks required fields: {', '.join(missing)}")
    if type(manifest["schema_version"]) is not int or manifest["schema_version"] != SCHEMA_VERSION:  # True == 1
        raise BundleError(f"manifest schema_version {manifest['schema_version']!r} is not supported by this loader "
                          f"(it reads version {SCHEMA_VERSION}); rebuild the bundle or use its own loader.py")
    for key, kind, what in _FIELD_TYPES:
        if not isinstance(manifest[key], kind):
            raise BundleError(f"manifest.json field {key!r} must be {what}, not {type(manifest[key]).__name__}")
    for key in ("files", "inputs", "outputs"):
        if not all(isinstance(f, dict) for f in manifest[key]):
            raise BundleError(f"manifest.json {key!r} must be a list of objects")
    return manifest


def verify(root, manifest=None):
    """Check every file the manifest lists against its sha256 and size. Returns the manifest."""
    root = Path(root)
    manifest = manifest or read_manifest(root)
    listed = set()
    for entry in manifest["files"]:
        rel, digest = entry.get("path"), entry.get("sha256")
        path = _safe_path(root, rel)
        listed.add(rel)
        if not path.is_file():
            raise BundleError(f"bundle file {rel} is missing")
        if "size" in entry and path.stat().st_size != entry["size"]:
            raise BundleError(f"checksum mismatch for {rel}: it has {path.stat().st_size} bytes, the manifest says "
                              f"{entry['size']}; the file was modified or corrupted after the build")
        if _sha256(path) != digest:
            raise BundleError(f"checksum mismatch for {rel}: the file was modified or corrupted after the build")
    if manifest["model_file"] not in listed:
        raise BundleError(f"the model file {manifest['model_file']!r} has no checksum in the manifest")
    return manifest


def preprocess_image(image, pre):
    """Image -> float32 array [C,H,W] or [H,W,C] (no batch axis), exactly as calibration saw it.

    ``image``: a path, a PIL image, or an HxW / HxWxC uint8 array. ``pre``: the manifest's preprocessing dict
    (size, resize_shorter, color, scale, mean, std, layout). Needs Pillow for decoding and resizing.
    """
    try:
        from PIL import Image
    except ImportError:
        raise BundleError("preprocessing images needs Pillow on the device: pip install pillow") from None
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            im.load()
            image = im.copy()
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    h, w = pre["size"]
    img = image.convert("L" if pre["color"] == "gray" else "RGB")
    if pre.get("resize_shorter"):
        n = pre["resize_shorter"]
        iw, ih = img.size
        r = n / min(iw, ih)
        img = img.resize((max(w, round(iw * r)), max(h, round(ih * r))), Image.BILINEAR)
        left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
        img = img.crop((left, top, left + w, top + h))
    else:
        img = img.resize((w, h), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if pre["color"] == "bgr":
        arr = arr[:, :, ::-1]
    arr = arr * np.float32(pre["scale"])
    arr = (arr - np.asarray(pre["mean"], dtype=np.float32)) / np.asarray(pre["std"], dtype=np.float32)
    if pre["layout"] == "nchw":
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype=np.float32)


TOKENIZER_FILE = "tokenizer/tokenizer.json"
# model input name -> attribute of a tokenizers.Encoding
TEXT_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


def text_settings(max_length):
    """Tokenization as recorded in the manifest: truncate and pad every text to ``max_length`` tokens."""
    return {"tokenizer": TOKENIZER_FILE, "max_length": int(max_length), "padding": "max_length", "truncation": True}


def encode_texts(tokenizer, texts, inputs):
    """Strings -> {input name: array}, one row per text; ``inputs`` are dicts with 'name' and 'dtype'.
    Build-time calibration and the device both tokenize through this one function."""
    encodings = tokenizer.encode_batch(list(texts))
    unknown = [i["name"] for i in inputs if i["name"] not in TEXT_FIELDS]
    if unknown:
        raise InputError(f"model input(s) {unknown} cannot be made from text; known: {sorted(TEXT_FIELDS)}")
    feeds = {i["name"]: np.array([getattr(e, TEXT_FIELDS[i["name"]]) for e in encodings], dtype=i["dtype"])
             for i in inputs}
    return feeds, encodings


def make_tokenizer(path, settings):
    """A ``tokenizers`` tokenizer configured as at build time (truncate and pad to max_length)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise BundleError("text input needs the tokenizers package: pip install tokenizers") from None
    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length=int(settings["max_length"]))
    if settings.get("padding") == "max_length":
        pad_id = tok.token_to_id("[PAD]")
        tok.enable_padding(length=int(settings["max_length"]), pad_id=pad_id if pad_id is not None else 0)
    return tok


def _version_tuple(v):
    out = []
    for part in str(v).split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


class _OrtBackend:
    runtime = "onnxruntime"

    def __init__(self, model_path, manifest, providers=None, threads=None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BundleError("this bundle needs onnxruntime: pip install -r requirements.txt") from None
        built = manifest["runtime"].get("onnxruntime", "0")
        self.runtime = "onnxruntime"
        if _version_tuple(ort.__version__)[:2] < _version_tuple(built)[:2]:
            print(f"warning: onnxruntime {ort.__version__} is older than {built}, which built this bundle; "
                  "if loading fails, upgrade onnxruntime", file=sys.stderr)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if manifest.get("runtime_config", {}).get("onnxruntime_fake_quant"):
            # run Q/DQ pairs as written (float fake-quantization), as the build validated them
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        available = ort.get_available_providers()
        providers = providers or ["CPUExecutionProvider"]
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise BundleError(f"execution provider(s) {unknown} are not available here; available: {available}")
        try:
            self.session = ort.InferenceSession(str(model_path), so, providers=providers)
        except Exception as e:
            raise BundleError(f"onnxruntime {ort.__version__} cannot load the model: {str(e).strip()[:300]}") from None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds):
        return dict(zip(self.output_names, self.session.run(None, feeds)))


def _litert_interpreter():
    """ai-edge-litert first; tflite_runtime or tensorflow.lite if that is what the device has."""
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter
        return Interpreter, "tflite-runtime"
    except ImportError:
        pass
    try:
        from tensorflow.lite import Interpreter
        return Interpreter, "tensorflow"
    except ImportError:
        raise BundleError("this bundle needs a TFLite runtime: pip install ai-edge-litert") from None


class _TfliteBackend:
    """Runs a .tflite through its signature. Hides the layout (NHWC inside, the model's layout outside unless
    layout='native') and int8/uint8 I/O (float in, float out). One lock: a TFLite interpreter is not thread-safe."""

    def __init__(self, model_path, manifest, providers=None, threads=None, layout="model"):
        if providers:
            raise BundleError("execution providers are an onnxruntime setting; TFLite bundles take threads only")
        interpreter_cls, self.runtime = _litert_interpreter()
        self.interp = interpreter_cls(model_path=str(model_path), num_threads=int(threads) if threads else None)
        self.runner = self.interp.get_signature_runner()
        self.in_details = self.runner.get_input_details()
        self.out_details = self.runner.get_output_details()
        cfg = manifest.get("runtime_config", {})
        self.in_perm = {} if layout == "native" else cfg.get("input_perm", {})
        self.out_perm = {} if layout == "native" else cfg.get("output_perm", {})
        self.lock = threading.Lock()

    @staticmethod
    def _quantize(x, d):
        scale, zero = d["quantization"]
        info = np.iinfo(d["dtype"])
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(d["dtype"])

    def run(self, feeds):
        args = {}
        for name, x in feeds.items():
            if name in self.in_perm:
                x = np.transpose(x, self.in_perm[name])
            d = self.in_details[name]
            if d["dtype"] in (np.int8, np.uint8) and x.dtype.kind == "f":
                x = self._quantize(x, d)
            args[name] = np.ascontiguousarray(x)
        with self.lock:
            out = self.runner(**args)
        result = {}
        for name, y in out.items():
            d = self.out_details[name]
            if d["dtype"] in (np.int8, np.uint8):
                scale, zero = d["quantization"]
                y = ((y.astype(np.float32) - zero) * scale).astype(np.float32)
            if name in self.out_perm:
                y = np.transpose(y, self.out_perm[name])
            result[name] = np.array(y)
        return result


# ---- TensorRT ---------------------------------------------------------------------------------------------------
# The code that talks to TensorRT is kept thin (trt_device, _trt_build_engine, _TrtSession); the decisions around it
# (compatibility, cache keys, the atomic engine cache, calibration cache text) are plain Python, tested without it.

CALIB_ALGORITHM = "EntropyCalibration2"  # the calibrator class the loader and trtexec --calib read caches with
_INT8_MIN_CC = (6, 1)
_FP16_MIN_CC = (5, 3)


def trt_version_int(version):
    """TensorRT's NV_TENSORRT_VERSION for a version string: 8.6.1 -> 8601, 10.3.0 -> 100300."""
    major, minor, patch = (_version_tuple(version) + (0, 0, 0))[:3]
    return major * 1000 + minor * 100 + patch if major < 10 else major * 10000 + minor * 100 + patch


def write_calibration_cache(scales, trt_version):
    """TensorRT calibration cache text: a header naming the version and algorithm, then one 'tensor: scale' line
    per tensor, the scale as the hex of its float32 bits (scale = amax / 127)."""
    import struct

    lines = [f"TRT-{trt_version_int(trt_version)}-{CALIB_ALGORITHM}"]
    for name in sorted(scales):
        if ":" in name or "\n" in name:
            raise BundleError(f"tensor name {name!r} cannot be written to a TensorRT calibration cache")
        bits = struct.unpack(">I", struct.pack(">f", float(scales[name])))[0]
        lines.append(f"{name}: {bits:08x}")
    return "\n".join(lines) + "\n"


def read_calibration_cache(text):
    """(header, {tensor: scale}) from calibration cache text; raises BundleError on anything malformed."""
    import struct

    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("TRT-") or lines[0].count("-") < 2:
        raise BundleError("calibration cache has no 'TRT-<version>-<algorithm>' header")
    scales = {}
    for ln in lines[1:]:
        name, sep, value = ln.rpartition(": ")
        if not sep or len(value) != 8:
            raise BundleError(f"malformed calibration cache line {ln[:80]!r}")
        try:
            scale = struct.unpack(">f", struct.pack(">I", int(value, 16)))[0]
        except ValueError:
            raise BundleError(f"malformed calibration cache value in {ln[:80]!r}") from None
        if not (scale > 0 and np.isfinite(scale)):
            raise BundleError(f"calibration cache scale for {name!r} is {scale}, not a positive number")
        scales[name] = scale
    return lines[0], scales


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python, as in TensorRT 10's samples
        except ImportError:
            raise BundleError("TensorRT bundles need cuda-python for host<->device copies: pip install cuda-python "
                              "(the version matching the device's CUDA)") from None
    return cudart


def _cuda_call(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:  # cudaSuccess; checked on every copy, so no module lookup here
        raise BundleError(f"CUDA call failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def trt_device():
    """What this machine offers TensorRT: {'tensorrt', 'gpu', 'compute_capability', 'dla_cores'}.
    Raises BundleError naming what is missing (the module, cuda-python, or a GPU)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BundleError(f"TensorRT is not installed here ({e}); on Jetson it comes with JetPack "
                          "(python3-libnvinfer), elsewhere: pip install tensorrt") from None
    cudart = _cudart()
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count < 1:
        raise BundleError(f"no CUDA GPU is visible ({err}); TensorRT needs an NVIDIA GPU")
    props = _cuda_call(cudart.cudaGetDeviceProperties(0))
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    return {"tensorrt": trt.__version__, "gpu": name, "compute_capability": f"{props.major}.{props.minor}",
            "dla_cores": int(getattr(builder, "num_DLA_cores", 0))}


def _cc(text):
    return tuple(int(x) for x in str(text).split(".")[:2])


def trt_compat_problems(trt_cfg, device):
    """Why this bundle cannot be built into an engine on ``device`` (empty list: it can)."""
    problems = []
    major = _version_tuple(device["tensorrt"])[0]
    supported = trt_cfg.get("tensorrt_majors", [10, 11])
    if major not in supported:
        problems.append(f"this bundle needs TensorRT {' or '.join(f'{m}.x' for m in supported)}; this device has "
                        f"TensorRT {device['tensorrt']} (JetPack 6 ships TensorRT 10)")
    if trt_cfg.get("int8_path") == "implicit" and major >= 11:
        problems.append(f"this bundle uses implicit INT8 calibration (a calibration cache), which TensorRT 11 removed; "
                        f"this device has TensorRT {device['tensorrt']}: rebuild the bundle with "
                        "--option int8_path=explicit (a Q/DQ graph)")
    precision = trt_cfg.get("precision")
    need = {"int8": _INT8_MIN_CC, "fp16": _FP16_MIN_CC}.get(precision)
    if need and _cc(device["compute_capability"]) < need:
        problems.append(f"{precision} needs compute capability >= {need[0]}.{need[1]}; {device['gpu']} has "
                        f"{device['compute_capability']}")
    dla = trt_cfg.get("builder", {}).get("dla_core")
    if dla is not None and dla >= device.get("dla_cores", 0) and not trt_cfg["builder"].get("gpu_fallback"):
        problems.append(f"the build asks for DLA core {dla} without GPU fallback; {device['gpu']} has "
                        f"{device.get('dla_cores', 0)} DLA core(s)")
    return problems


def engine_fit_problems(built_for, device, builder):
    """Why a prebuilt engine cannot run on ``device``: TensorRT engines are tied to the TensorRT version and GPU."""
    problems = []
    same_version = device["tensorrt"] == built_for["tensorrt"]
    if builder.get("version_compatible"):
        bt, dt = _version_tuple(built_for["tensorrt"]), _version_tuple(device["tensorrt"])
        same_version = dt[0] == bt[0] and dt >= bt
    if not same_version:
        problems.append(f"TensorRT {device['tensorrt']} here, the engine was built with {built_for['tensorrt']}"
                        + (" (version-compatible engines run on the same or a newer minor of the same major)"
                           if builder.get("version_compatible") else ""))
    if builder.get("hardware_compatibility") == "ampere+":
        if _cc(device["compute_capability"]) < (8, 0):
            problems.append(f"the engine is hardware-compatible with Ampere and newer (compute >= 8.0); "
                            f"{device['gpu']} has {device['compute_capability']}")
    elif device["gpu"] != built_for["gpu"] or device["compute_capability"] != built_for["compute_capability"]:
        problems.append(f"the engine was built for {built_for['gpu']} (compute {built_for['compute_capability']}); "
                        f"this device is {device['gpu']} (compute {device['compute_capability']})")
    return problems


def _slug(text):
    return "".join(ch if ch.isalnum() or ch in "._" else "-" for ch in str(text)).strip("-") or "x"


def engine_cache_key(model_sha256, device, precision, builder):
    dla = builder.get("dla_core")
    return "-".join([model_sha256[:16], f"trt{_slug(device['tensorrt'])}", _slug(device["gpu"]),
                     f"sm{device['compute_capability'].replace('.', '')}", precision]
                    + ([f"dla{dla}"] if dla is not None else []))


def default_engine_cache(root):
    """Engines built on the device live next to the bundle (never inside it: its files are checksummed), or in
    $EDGEEXPORT_ENGINE_CACHE."""
    env = os.environ.get("EDGEEXPORT_ENGINE_CACHE")
    return Path(env) if env else Path(root).resolve().parent / f"{Path(root).resolve().name}.engines"


def _write_atomic(path, data):
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _FileLock:
    """An exclusive lock between processes building the same engine (POSIX flock; a no-op where unavailable)."""

    def __init__(self, path):
        self.path, self.fd = path, None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            import fcntl
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def cached_engine(cache_dir, key, build, log=None):
    """The engine plan for ``key``: read from ``cache_dir`` if a complete, intact entry exists, else made by
    ``build() -> (plan_bytes, info_dict)`` and stored atomically (plan first, then its record with the plan's
    sha256: a record is written only after its plan, so a crash never leaves an entry that looks complete)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    plan_path, record_path = cache_dir / f"{key}.plan", cache_dir / f"{key}.json"

    def read():
        if not (plan_path.is_file() and record_path.is_file()):
            return None
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except ValueError:
            record = {}
        if record.get("sha256") != _sha256(plan_path):
            log(f"engine cache entry {plan_path} is incomplete or corrupt; rebuilding it")
            return None
        return plan_path.read_bytes()

    plan = read()
    if plan is not None:
        return plan, plan_path, False
    with _FileLock(cache_dir / f"{key}.lock"):
        plan = read()  # another process may have built it while we waited
        if plan is not None:
            return plan, plan_path, False
        plan, info = build()
        _write_atomic(plan_path, plan)
        record = dict(info, sha256=hashlib.sha256(plan).hexdigest(), size=len(plan))
        _write_atomic(record_path, json.dumps(record, indent=2).encode())
    return plan, plan_path, True


def _trt_build_engine(onnx_path, trt_cfg, calib_cache_text=None, timing_cache=None, log=None):
    """Build a serialized engine (a plain TensorRT plan) from the bundle's ONNX with the recorded builder settings.
    Returns (plan bytes, timing cache bytes). TensorRT 10 and 11 Python APIs."""
    import tensorrt as trt

    log = log or (lambda msg: print(msg, file=sys.stderr))
    b = trt_cfg["builder"]
    major = _version_tuple(trt.__version__)[0]
    implicit = trt_cfg.get("int8_path") == "implicit"
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if major < 11 and not implicit:  # 11: every network is strongly typed; 10: ask for it (types from the graph)
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(f"TensorRT {trt.__version__} cannot parse the model: {errors[:600]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(b["workspace_mb"]) << 20)
    if b.get("profiles"):
        profile = builder.create_optimization_profile()
        for name, p in b["profiles"].items():
            profile.set_shape(name, p["min"], p["opt"], p["max"])
        config.add_optimization_profile(profile)
    if implicit:
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _cache_calibrator(trt, calib_cache_text)
    if b.get("dla_core") is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(b["dla_core"])
        if b.get("gpu_fallback"):
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if b.get("hardware_compatibility") == "ampere+":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if b.get("version_compatible"):
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    cache = None
    if b.get("timing_cache"):
        cache = config.create_timing_cache(timing_cache or b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    log(f"building the TensorRT {trt.__version__} engine (this takes a while, once per device)")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BundleError("TensorRT failed to build the engine; its log above says why")
    new_cache = bytes(config.get_timing_cache().serialize()) if cache is not None else b""
    return bytes(plan), new_cache


def _cache_calibrator(trt, cache_text):
    """An IInt8EntropyCalibrator2 that never calibrates: it hands TensorRT the bundle's cache, re-headed for the
    TensorRT version here (TensorRT ignores a cache whose header names another version)."""
    _, scales = read_calibration_cache(cache_text)
    data = write_calibration_cache(scales, trt.__version__).encode()

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            return None

        def read_calibration_cache(self):
            return data

        def write_calibration_cache(self, cache):
            return None

    return CacheCalibrator()


class _TrtSession:
    """Deserialize a plan and run it: host<->device copies with cuda-python, as TensorRT's own samples do."""

    def __init__(self, plan):
        import tensorrt as trt

        self.trt = trt
        self.cudart = _cudart()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BundleError("TensorRT could not deserialize the engine: it was built by another TensorRT version "
                              "or for another GPU; delete it from the engine cache to rebuild")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.stream = _cuda_call(self.cudart.cudaStreamCreate())
        self.buffers = {}  # name -> (nbytes, device pointer)
        self.lock = threading.Lock()  # one execution context: one inference at a time

    def _buffer(self, name, nbytes):
        size, ptr = self.buffers.get(name, (0, None))
        if size < nbytes:
            if ptr is not None:
                _cuda_call(self.cudart.cudaFree(ptr))
            ptr = _cuda_call(self.cudart.cudaMalloc(max(nbytes, 1)))
            self.buffers[name] = (nbytes, ptr)
        return ptr

    def run(self, feeds):
        cudart, h2d, d2h = self.cudart, 1, 2  # cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost
        with self.lock:
            for name in self.inputs:
                x = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
                self.context.set_input_shape(name, x.shape)
                ptr = self._buffer(name, x.nbytes)
                _cuda_call(cudart.cudaMemcpyAsync(ptr, x.ctypes.data, x.nbytes, cudart.cudaMemcpyKind(h2d), self.stream))
                self.context.set_tensor_address(name, int(ptr))
            results = {}
            for name in self.outputs:
                y = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name])
                results[name] = y
                self.context.set_tensor_address(name, int(self._buffer(name, y.nbytes)))
            if not self.context.execute_async_v3(self.stream):
                raise BundleError("TensorRT inference failed (execute_async_v3 returned false)")
            for name, y in results.items():
                _cuda_call(cudart.cudaMemcpyAsync(y.ctypes.data, self.buffers[name][1], y.nbytes,
                                                  cudart.cudaMemcpyKind(d2h), self.stream))
            _cuda_call(cudart.cudaStreamSynchronize(self.stream))
        return {name: results[name].astype(np.float32) if results[name].dtype == np.float16 else results[name]
                for name in self.outputs}


class _TrtBackend:
    """Checks the device against the manifest, then runs the bundle's prebuilt engine when it fits this device, or
    builds one from the bundle's ONNX on first load and caches it (see :func:`cached_engine`).

    ``engine``: 'auto' (prebuilt if it fits, else build and cache), 'prebuilt' (refuse to build), 'rebuild'."""

    runtime = "tensorrt"

    def __init__(self, model_path, manifest, providers=None, threads=None, root=None, engine="auto",
                 cache_dir=None, engine_file=None, log=None):
        if providers or threads:
            raise BundleError("providers and threads are onnxruntime settings; TensorRT bundles take neither")
        log = log or (lambda msg: print(msg, file=sys.stderr))
        cfg = manifest["runtime_config"]["trt"]
        device = trt_device()
        problems = trt_compat_problems(cfg, device)
        if problems:
            raise BundleError("this bundle cannot run on this device: " + "; ".join(problems))
        root = Path(root)
        plan, self.engine_path = None, None
        if engine_file:  # an engine the user built (e.g. with build_engine.sh): TensorRT checks it on deserializing
            self.engine_path = Path(engine_file)
            plan = self.engine_path.read_bytes()
        elif cfg.get("engine") and engine != "rebuild":
            unfit = engine_fit_problems(cfg["engine"]["built_for"], device, cfg["builder"])
            if not unfit:
                self.engine_path = _safe_path(root, cfg["engine"]["file"])
                plan = self.engine_path.read_bytes()
            elif engine == "prebuilt":
                raise BundleError("the bundle's engine does not fit this device: " + "; ".join(unfit))
            else:
                log("the bundle's engine does not fit this device (" + "; ".join(unfit) + "); building one for this "
                    "device from the bundle's ONNX")
        elif engine == "prebuilt":
            raise BundleError("this bundle has no prebuilt engine (it was exported without a GPU); load it with "
                              "engine='auto' to build one on this device")
        if plan is None:
            plan, self.engine_path = self._build_cached(root, manifest, cfg, device, model_path, cache_dir, log)
        self.session = _TrtSession(plan)
        self.output_names = [o["name"] for o in manifest["outputs"]]

    @staticmethod
    def _build_cached(root, manifest, cfg, device, model_path, cache_dir, log):
        model_sha = next(f["sha256"] for f in manifest["files"] if f["path"] == manifest["model_file"])
        key = engine_cache_key(model_sha, device, manifest["precision"], cfg["builder"])
        cache_dir = Path(cache_dir) if cache_dir else default_engine_cache(root)
        timing = cache_dir / f"timing-trt{_slug(device['tensorrt'])}-{_slug(device['gpu'])}.cache"

        def build():
            calib = _safe_path(root, cfg["calibration_cache"]).read_text() if cfg.get("calibration_cache") else None
            plan, new_timing = _trt_build_engine(model_path, cfg, calib, timing.read_bytes() if timing.is_file()
                                                 else None, log)
            if new_timing:
                _write_atomic(timing, new_timing)
            return plan, {"device": device, "builder": cfg["builder"], "model_sha256": model_sha}

        plan, path, built = cached_engine(cache_dir, key, build, log)
        log(f"{'built and cached' if built else 'using cached'} TensorRT engine {path}")
        return plan, path

    def run(self, feeds):
        out = self.session.run(feeds)
        return {name: out[name] for name in self.output_names}


_BACKENDS = {"ort": _OrtBackend, "tflite": _TfliteBackend, "trt": _TrtBackend}


class Model:
    """A verified, loaded bundle. Call it with a dict of arrays (or one array for a one-input model)."""

    def __init__(self, root, manifest, backend):
        self.root = Path(root)
        self.manifest = manifest
        self.inputs = manifest["inputs"]
        self.outputs = manifest["outputs"]
        self._backend = backend
        self._tokenizer = None

    def __repr__(self):
        ins = ", ".join(f"{i['name']}:{i['shape']}:{i['dtype']}" for i in self.inputs)
        return f"<edgeexport Model {self.manifest['target']}/{self.manifest['precision']} inputs=[{ins}]>"

    def check_inputs(self, inputs):
        if isinstance(inputs, np.ndarray):
            if len(self.inputs) != 1:
                names = [i["name"] for i in self.inputs]
                raise InputError(f"this model has {len(names)} inputs {names}; pass a dict keyed by input name")
            inputs = {self.inputs[0]["name"]: inputs}
        if not isinstance(inputs, dict):
            raise InputError(f"inputs must be a dict of numpy arrays (or one array), not {type(inputs).__name__}")
        want = {i["name"]: i for i in self.inputs}
        if set(inputs) != set(want):
            raise InputError(f"input names {sorted(inputs)} do not match the model's {sorted(want)}")
        for name, spec in want.items():
            arr = inputs[name]
            if not isinstance(arr, np.ndarray):
                raise InputError(f"input {name!r} must be a numpy array, not {type(arr).__name__}")
            if str(arr.dtype) != spec["dtype"]:
                raise InputError(f"input {name!r} has dtype {arr.dtype}; the model needs {spec['dtype']} "
                                 f"(use .astype(np.{spec['dtype']}))")
            shape = spec["shape"]
            if arr.ndim != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(shape, arr.shape)):
                raise InputError(f"input {name!r} has shape {list(arr.shape)}; the model needs {shape} "
                                 "(named dimensions may vary)")
        return inputs

    def preprocess(self, image):
        """Turn an image (path, PIL image or uint8 array) into the model's input, batch of one, as calibrated."""
        pre = self.manifest.get("preprocess")
        if not pre:
            raise InputError("this bundle records no image preprocessing (it was not calibrated on images)")
        return preprocess_image(image, pre)[None]

    def encode(self, texts):
        """Strings -> input feeds, tokenized exactly as calibration and validation were (one row per text)."""
        text = self.manifest.get("text")
        if not text:
            raise InputError("this bundle has no tokenizer: pass arrays keyed by input name")
        if self._tokenizer is None:
            self._tokenizer = make_tokenizer(_safe_path(self.root, text["tokenizer"]), text)
        return encode_texts(self._tokenizer, [texts] if isinstance(texts, str) else texts, self.inputs)[0]

    def __call__(self, inputs):
        if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)):
            feeds = self.encode(inputs)
            if all(isinstance(i["shape"][0], str) for i in self.inputs):
                return self._backend.run(self.check_inputs(feeds))
            rows = [self._backend.run(self.check_inputs({k: v[j:j + 1] for k, v in feeds.items()}))
                    for j in range(len(next(iter(feeds.values()))))]
            return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        return self._backend.run(self.check_inputs(inputs))

    def golden(self):
        """Yield (inputs, expected_outputs) pairs stored in the bundle."""
        for rel in self.manifest["golden"]["files"]:
            with np.load(_safe_path(self.root, rel), allow_pickle=False) as z:
                ins = {k[len("input/"):]: z[k] for k in z.files if k.startswith("input/")}
                outs = {k[len("output/"):]: z[k] for k in z.files if k.startswith("output/")}
            yield ins, outs

    def selftest(self, verbose=True):
        """Run the golden pairs. Returns True when every output matches within the manifest's tolerance."""
        if self.inputs is not self.manifest["inputs"]:
            raise InputError("the golden pairs are in the model's layout: run the self-test on load(..., layout='model')")
        tol = self.manifest["golden"]["tolerance"]
        ok = True
        for n, (ins, expected) in enumerate(self.golden()):
            got = self(ins)
            for name, want in expected.items():
                out = np.asarray(got[name], dtype=np.float64).ravel()
                ref = np.asarray(want, dtype=np.float64).ravel()
                err = float(np.max(np.abs(out - ref))) if ref.size else 0.0
                denom = float(np.linalg.norm(out) * np.linalg.norm(ref))
                cos = float(np.dot(out, ref) / denom) if denom > 0 else float(np.allclose(out, ref))
                atol = tol["atol"].get(name, 0.0)
                good = out.shape == ref.shape and err <= atol and cos >= tol["min_cosine"]
                ok &= good
                if verbose:
                    print(f"golden {n} {name}: max_abs {err:.3g} (<= {atol:.3g}), cosine {cos:.6f} "
                          f"(>= {tol['min_cosine']}) {'ok' if good else 'MISMATCH'}")
        return ok


def load(root=None, providers=None, threads=None, verify_files=True, layout="model", runtime=None, engine="auto",
         engine_cache=None, engine_file=None):
    """Verify the bundle at ``root`` (default: this file's folder) and load it.

    ``layout='native'`` (TFLite) feeds and returns tensors in the runtime's own layout (e.g. NHWC), skipping the
    transposes; the default takes and returns the layout the PyTorch model used.
    TensorRT bundles: ``engine`` is 'auto' (the bundle's engine if it fits this GPU and TensorRT, else build one
    from the ONNX on first load and cache it in ``engine_cache``, default ``<bundle>.engines/`` beside the bundle),
    'prebuilt' or 'rebuild'; ``engine_file`` runs a plan you built yourself (build_engine.sh); ``runtime='onnxruntime'`` runs the bundle's ONNX on onnxruntime instead, exactly as the
    build validated it (for checking a bundle on a machine without a GPU)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent
    if is_archive(root):  # extracted (safely) into a private temporary folder, removed when the process exits
        archive, root = root, extract_archive(root)
        if engine_cache is None:
            engine_cache = default_engine_cache(archive)
    manifest = read_manifest(root)
    if verify_files:
        verify(root, manifest)
    target = manifest["target"]
    if target not in _BACKENDS:
        raise BundleError(f"this loader cannot run target {target!r}; it knows {sorted(_BACKENDS)}")
    if layout != "model" and target != "tflite":
        raise BundleError(f"layout={layout!r} applies to TFLite bundles only")
    if runtime not in (None, "onnxruntime") or (runtime and target != "trt"):
        raise BundleError(f"runtime={runtime!r}: only TensorRT bundles can be run on another runtime (onnxruntime)")
    model_path = _safe_path(root, manifest["model_file"])
    if target == "tflite":
        backend = _TfliteBackend(model_path, manifest, providers=providers, threads=threads, layout=layout)
    elif runtime == "onnxruntime":
        backend = _OrtBackend(model_path, manifest, providers=providers, threads=threads)
    elif target == "trt":
        backend = _TrtBackend(model_path, manifest, providers=providers, threads=threads, root=root, engine=engine,
                              cache_dir=engine_cache, engine_file=engine_file)
    else:
        backend = _BACKENDS[target](model_path, manifest, providers=providers, threads=threads)
    model = Model(root, manifest, backend)
    if layout == "native":
        model.inputs = manifest["runtime_config"]["native_inputs"]
        model.outputs = manifest["runtime_config"]["native_outputs"]
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description="Verify and self-test an edgeexport bundle.")
    parser.add_argument("--bundle", default=None,
                        help="bundle folder or archive (.tar.gz, .zip) (default: this file's folder)")
    parser.add_argument("--selftest", action="store_true", help="run the golden input/output pairs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--providers", default=None, help="comma-separated execution providers")
    parser.add_argument("--engine", choices=["auto", "prebuilt", "rebuild"], default="auto",
                        help="TensorRT: use the bundle's engine if it fits, else build and cache one (auto)")
    parser.add_argument("--engine-cache", default=None, help="TensorRT: engine cache folder [<bundle>.engines]")
    parser.add_argument("--engine-file", default=None, help="TensorRT: run this plan (e.g. from build_engine.sh)")
    parser.add_argument("--runtime", choices=["onnxruntime"], default=None,
                        help="TensorRT bundles: run the ONNX on onnxruntime instead (no GPU needed)")
    args = parser.parse_args(argv)
    try:
        model = load(args.bundle, providers=args.providers.split(",") if args.providers else None, threads=args.threads,
                     runtime=args.runtime, engine=args.engine, engine_cache=args.engine_cache,
                     engine_file=args.engine_file)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"verified {model!r}")
    if args.selftest:
        if not model.selftest():
            print("selftest FAILED: outputs differ from the golden pairs", file=sys.stderr)
            return 1
        print("selftest passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
