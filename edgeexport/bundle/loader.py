#!/usr/bin/env python3
"""edgeexport bundle loader: one file, needs only numpy and the target runtime (never torch).

    from loader import load
    model = load("path/to/bundle")          # verifies checksums and versions first
    outputs = model({"image": x})            # dict in, dict out (a single array is fine for one-input models)

    python loader.py --selftest              # runs the golden input/output pairs; exit 0 = pass

The shipped file is assembled at bundle time: this core (integrity checks, preprocessing, the Model around a
backend) followed by the one runtime backend the bundle needs, taken from its target's unit
(``targets/<name>/backend.py``). A backend registers itself with ``@backend("<target>")``; ``load()`` options that
a backend declares (for example TensorRT's ``engine=``) become ``loader.py`` flags too. It never unpickles and never
executes code from the bundle.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

import numpy as np

SCHEMA_VERSION = 1
_REQUIRED = ("schema_version", "target", "precision", "model_file", "files", "inputs", "outputs", "runtime", "golden")
_FIELD_TYPES = (("target", str, "a string"), ("precision", str, "a string"), ("model_file", str, "a string"),
                ("files", list, "a list"), ("inputs", list, "a list"), ("outputs", list, "a list"),
                ("runtime", dict, "an object"), ("golden", dict, "an object"))
_MAX_MANIFEST_BYTES = 16 << 20
_NUMPY_DTYPES = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


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
    _check_fields(manifest)
    return manifest


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _check_fields(m):
    """Every field the loader reads has the type it needs, so an edited manifest is a BundleError naming the field,
    never a crash deep inside a run (or a self-test that checks nothing)."""
    def bad(field, want, value):
        raise BundleError(f"manifest.json field {field} must be {want}, not {json.dumps(value)[:80]}")

    for key in ("inputs", "outputs"):
        if not m[key]:
            raise BundleError(f"manifest.json {key!r} is empty: a model has at least one {key[:-1]}")
        names = set()
        for i, t in enumerate(m[key]):
            name, shape, dtype = t.get("name"), t.get("shape"), t.get("dtype")
            if not isinstance(name, str) or not name or name in names:
                bad(f"{key}[{i}].name", "a non-empty name used once", name)
            names.add(name)
            if not isinstance(shape, list) or not all(d is None or (type(d) is int and d >= 0) or
                                                      (isinstance(d, str) and d) for d in shape):
                bad(f"{key}[{i}].shape", "a list of sizes (integers) or dimension names", shape)
            if not isinstance(dtype, str) or not dtype:
                bad(f"{key}[{i}].dtype", "a dtype name such as \"float32\"", dtype)
    for i, f in enumerate(m["files"]):
        if not isinstance(f.get("path"), str) or not isinstance(f.get("sha256"), str):
            bad(f"files[{i}]", "an object with a string path and sha256", f)
        if "size" in f and not (type(f["size"]) is int and f["size"] >= 0):
            bad(f"files[{i}].size", "a byte count", f["size"])
    if "model_files" in m and not (isinstance(m["model_files"], list) and all(isinstance(x, str) for x in m["model_files"])):
        bad("model_files", "a list of paths", m["model_files"])
    for key in ("runtime_config", "preprocess", "text"):
        if m.get(key) is not None and not isinstance(m[key], dict):
            bad(key, "an object (or absent)", m[key])
    if not all(isinstance(v, str) for v in m["runtime"].values()):
        bad("runtime", "an object of package versions (strings)", m["runtime"])
    g = m["golden"]
    files, tol = g.get("files"), g.get("tolerance")
    if not isinstance(files, list) or not all(isinstance(x, str) for x in files):
        bad("golden.files", "a list of paths", files)
    if not files:
        raise BundleError("manifest.json golden.files is empty: the bundle has no golden pairs to check it with")
    listed = {f["path"] for f in m["files"]}
    if any(x not in listed for x in files):
        raise BundleError("manifest.json golden.files names a file that has no checksum in files[]")
    if not isinstance(tol, dict) or not _number(tol.get("min_cosine")) or not 0 <= tol["min_cosine"] <= 1 \
            or not isinstance(tol.get("atol"), dict) or not all(_number(v) and v >= 0 for v in tol["atol"].values()) \
            or not {o["name"] for o in m["outputs"]} <= set(tol["atol"]):
        bad("golden.tolerance", "an object with min_cosine (0 to 1) and atol: {output: number} for every output", tol)
    state = m.get("state")
    if state is not None:
        pairs, initial = state.get("pairs") if isinstance(state, dict) else None, \
            state.get("initial") if isinstance(state, dict) else None
        ins, outs = {i["name"] for i in m["inputs"]}, {o["name"] for o in m["outputs"]}
        if not isinstance(pairs, dict) or not pairs or not all(k in ins and v in outs for k, v in pairs.items()):
            bad("state.pairs", "an object mapping state inputs to the outputs fed back into them", pairs)
        if not isinstance(initial, dict) or not all(
                isinstance(initial.get(k), dict) and isinstance(initial[k].get("shape"), list)
                and all(type(d) is int and d > 0 for d in initial[k]["shape"]) for k in pairs):
            bad("state.initial", "an object giving each state input's shape", initial)
    pre = m.get("preprocess")
    if pre:
        size = pre.get("size")
        if not (isinstance(size, list) and len(size) == 2 and all(type(d) is int and d > 0 for d in size)):
            bad("preprocess.size", "[height, width]", size)
        for key in ("mean", "std"):
            if not (isinstance(pre.get(key), list) and pre[key] and all(_number(v) for v in pre[key])):
                bad(f"preprocess.{key}", "a list of numbers", pre.get(key))
        if not _number(pre.get("scale")) or pre.get("color") not in ("rgb", "bgr", "gray") \
                or pre.get("layout") not in ("nchw", "nhwc") or 0 in pre["std"]:
            bad("preprocess", "scale (number), color (rgb/bgr/gray), layout (nchw/nhwc) and non-zero std", pre)


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
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit images (PNG, TIFF): scaled to the 8-bit range first, so --scale 1/255 means what it means for
        # 8-bit files (a plain convert() would clip everything above 255: a near-white image)
        image = Image.fromarray(np.clip(np.round(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8))
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
    if settings.get("truncation", True):
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



def warn_if_older(package, installed, manifest):
    """Warn (not fail: old runtimes often still work) when ``package`` is an older minor release than the one that
    built the bundle (``manifest['runtime'][package]``)."""
    built = manifest["runtime"].get(package, "0")
    if _version_tuple(installed)[:2] < _version_tuple(built)[:2]:
        print(f"warning: {package} {installed} is older than {built}, which built this bundle; if loading fails, "
              f"upgrade {package}", file=sys.stderr)


#: x86 feature flags of int8 dot products that accumulate in int32 (VPDPBUSD and AMX): no int16 intermediate sums
_INT32_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags():
    """This CPU's feature flags (from /proc/cpuinfo), or None where they cannot be read. EDGEEXPORT_CPU_FLAGS
    (space-separated flags) stands in for them: to check how a bundle would behave on another x86 CPU."""
    forced = os.environ.get("EDGEEXPORT_CPU_FLAGS")
    if forced is not None:
        return set(forced.split())
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def int8_saturation():
    """Why this CPU's int8 kernels would saturate with full 8-bit weights, or '' when they do not (or it cannot
    tell). x86 CPUs with AVX2 or AVX-512 but without VNNI multiply uint8 activations by int8 weights with
    VPMADDUBSW, which adds each pair of products into int16 with saturation: 255 x 127 x 2 = 64,770 does not fit
    in 32,767. onnxruntime's and OpenVINO's int8 kernels use it there. VNNI and AMX (x86), ARM64 (SDOT, I8MM) and
    GPUs accumulate in int32 and compute what the Q/DQ graph says. 7-bit weights (reduce_range) cannot saturate."""
    import platform

    flags = cpu_flags()
    if os.environ.get("EDGEEXPORT_CPU_FLAGS") is None and \
            platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return ""
    if not flags or "avx2" not in flags or any(f in flags for f in _INT32_DOT_FLAGS):
        return ""
    return ("this x86 CPU has AVX2 but no VNNI (no avx512_vnni or avx_vnni flag): its int8 kernels add pairs of "
            "uint8 x int8 products into int16 with saturation (VPMADDUBSW), and full 8-bit weights overflow it")


INT8_KERNELS = ("auto", "native", "exact")


def int8_kernel_choice(manifest, asked=None, fix=""):
    """(exact, warning): whether to run the bundle's int8 graph as written (float arithmetic on the quantized values:
    the result of a device that accumulates in int32) instead of with the runtime's int8 kernels on this CPU, and
    the warning to print ('' for none). ``runtime_config.int8`` says what the bundle's int8 is: ``weight_bits`` (8,
    or 7 with reduce_range) and ``qdq`` (quantization written in the graph as Q/DQ or FakeQuantize, which can run
    as written). ``fix`` is the backend's way to build for such a CPU."""
    asked = asked or "auto"
    if asked not in INT8_KERNELS:
        raise BundleError(f"int8_kernels must be one of {', '.join(INT8_KERNELS)}, not {asked!r}")
    int8 = (manifest.get("runtime_config") or {}).get("int8")
    if asked == "exact":
        if not (isinstance(int8, dict) and int8.get("qdq")):
            raise BundleError("int8_kernels='exact' runs a graph's Q/DQ (FakeQuantize) pairs as written; this "
                              f"bundle has none (precision {manifest.get('precision')})")
        return True, ""
    if asked == "native" or not isinstance(int8, dict) or int8.get("weight_bits") != 8:
        return False, ""
    why = int8_saturation()
    if not why:
        return False, ""
    if int8.get("qdq"):
        return True, (f"warning: {why}; so this bundle's int8 graph runs as written (exact, slower than int8 "
                      f"kernels){'. For int8 speed on this CPU, ' + fix if fix else ''}; int8_kernels='native' "
                      "runs the saturating kernels anyway")
    return False, (f"warning: {why}; this bundle's outputs on this CPU may differ from the ones it was validated "
                   f"with{'. ' + fix[0].upper() + fix[1:] if fix else ''}")


class OnnxSession:
    """The bundle's ONNX on onnxruntime: the ONNX Runtime backend, and any backend's way to run the ONNX it ships
    exactly as the build validated it (TensorRT's ``runtime='onnxruntime'``). ``exact=True`` runs the Q/DQ pairs
    as written (float arithmetic on the quantized values, no graph optimization): the int8 result of a device that
    accumulates in int32, on any CPU, more slowly."""

    runtime = "onnxruntime"

    def __init__(self, model_path, manifest, providers=None, threads=None, exact=False):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BundleError("this bundle needs onnxruntime: pip install -r requirements.txt") from None
        warn_if_older("onnxruntime", ort.__version__, manifest)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if exact or (manifest.get("runtime_config") or {}).get("onnxruntime_fake_quant"):
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


# ---- text generation ---------------------------------------------------------------------------------------------
# A decoder bundle (--task text-generation) ships the graph optimum exports for text-generation-with-past: inputs
# input_ids [batch, sequence], attention_mask [batch, past + sequence], optionally position_ids, and per layer
# past_key_values.N.key/value [batch, heads, past, head_dim]; outputs logits and present.N.key/value. The prefill
# feeds an empty cache (past 0) and the prompt, each decode step one token and the cache the last call returned.

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


class Layout:
    """Where a KV-cache decoder graph keeps what: the names and shapes ``KVDecoder`` feeds. ``past``: the
    past_key_values.N.key/value inputs in layer order; ``present``: the matching outputs; ``heads`` and
    ``head_dims``: dims 1 and 3 of each past input; ``dtype``: the cache's numpy dtype; ``position_ids``: whether the
    graph takes them."""

    def __init__(self, past, present, heads, head_dims, dtype, position_ids, logits):
        self.past, self.present, self.heads, self.head_dims = past, present, heads, head_dims
        self.dtype, self.position_ids, self.logits = dtype, position_ids, logits


def decoder_layout(inputs, outputs):
    """Read the layout from onnxruntime's (or onnx's) input/output descriptions: objects with ``name``, ``shape``
    and ``type`` ('tensor(float)'). Raises BundleError naming what is missing."""
    names = [i.name for i in inputs]
    out_names = [o.name for o in outputs]
    past = sorted((i for i in inputs if _PAST.match(i.name)),
                  key=lambda i: (int(_PAST.match(i.name).group(1)), _PAST.match(i.name).group(2)))
    missing = [n for n in ("input_ids", "attention_mask") if n not in names]
    if missing or not past or "logits" not in out_names:
        raise BundleError(
            "the graph is not a decoder with a KV cache: it needs input_ids, attention_mask and "
            "past_key_values.N.key/value inputs and a logits output"
            + (f" (missing: {', '.join(missing)})" if missing else "")
            + ("" if past else " (no past_key_values inputs)") + ("" if "logits" in out_names else " (no logits output)"))
    present = [p.name.replace("past_key_values.", "present.") for p in past]
    absent = [p for p in present if p not in out_names]
    if absent:
        raise BundleError(f"the graph has past inputs but not the matching present outputs: {', '.join(absent[:4])}")
    dims = [list(p.shape) for p in past]
    bad = [p.name for p, d in zip(past, dims) if len(d) != 4 or not isinstance(d[1], int) or not isinstance(d[3], int)]
    if bad:
        raise BundleError(f"past inputs must be [batch, heads, past, head_dim] with fixed heads and head_dim: "
                           f"{', '.join(bad[:4])}")
    types = {p.type for p in past}
    dtype = np.float16 if types == {"tensor(float16)"} else np.float32
    return Layout([p.name for p in past], present, [d[1] for d in dims], [d[3] for d in dims], dtype,
                  "position_ids" in names, "logits")


class KVDecoder:
    """Prefill and decode steps over an onnxruntime session of a KV-cache decoder; the cache stays in numpy."""

    def __init__(self, session, context=None):
        self.session = session
        self.layout = decoder_layout(session.get_inputs(), session.get_outputs())
        self.context = context  # the model's maximum positions (n_positions), when known

    def empty(self, batch=1):
        lay = self.layout
        return [np.zeros((batch, h, 0, d), lay.dtype) for h, d in zip(lay.heads, lay.head_dims)]

    def step(self, ids, past):
        """Run ``ids`` [batch, n] after ``past`` (the cache of every earlier position); returns the logits
        [batch, n, vocab] (float32) and the cache extended by n positions."""
        lay = self.layout
        ids = np.asarray(ids, dtype=np.int64)
        start = past[0].shape[2]
        end = start + ids.shape[1]
        if self.context is not None and end > self.context:
            raise InputError(f"{end} tokens exceed the model's context of {self.context} positions")
        feeds = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], end), np.int64)}
        if lay.position_ids:
            feeds["position_ids"] = np.broadcast_to(np.arange(start, end, dtype=np.int64), ids.shape).copy()
        feeds.update(zip(lay.past, past))
        out = self.session.run([lay.logits] + lay.present, feeds)
        return np.asarray(out[0], dtype=np.float32), list(out[1:])

    def generate(self, prompt, max_new_tokens, temperature=0.0, top_k=0, stop=(), seed=None):
        """Token ids after ``prompt``: greedy at temperature 0, else sampled from the top_k (0: all) tokens at
        that temperature. Stops at a token of ``stop`` (not included) or after max_new_tokens."""
        if not len(prompt):
            raise InputError("the prompt is empty: give at least one token")
        if max_new_tokens < 0 or temperature < 0 or top_k < 0:
            raise InputError("max_new_tokens, temperature and top_k must be >= 0")
        if self.context is not None and len(prompt) > self.context:
            raise InputError(f"the prompt has {len(prompt)} tokens; the model's context is {self.context}")
        if self.context is not None:
            max_new_tokens = min(max_new_tokens, self.context - len(prompt))
        rng = np.random.default_rng(seed)
        stops = set(stop)
        out = []
        logits, past = self.step(np.asarray([list(prompt)]), self.empty())
        for _ in range(max_new_tokens):
            token = pick(logits[0, -1], temperature, top_k, rng)
            if token in stops:
                break
            out.append(token)
            if len(out) == max_new_tokens:
                break
            logits, past = self.step(np.asarray([[token]]), past)
        return out


def pick(logits, temperature, top_k, rng):
    """The next token from one position's logits: argmax at temperature 0, else a sample."""
    if temperature == 0:
        return int(np.argmax(logits))
    lg = logits.astype(np.float64) / temperature
    if top_k and top_k < lg.size:
        cut = np.partition(lg, -top_k)[-top_k]
        lg = np.where(lg >= cut, lg, -np.inf)
    p = np.exp(lg - lg.max())
    p /= p.sum()
    return int(rng.choice(lg.size, p=p))


# ---- backends ---------------------------------------------------------------------------------------------------
# A backend is a class registered with @backend("<target>"): ``options`` maps each load() keyword it takes to
# (help, choices or None); ``__init__(model_path, manifest, root, archive, providers, threads, **options)`` opens the
# model (raising BundleError with the reason when this device cannot run it); ``run(feeds) -> dict`` runs it; an
# optional ``io`` = (inputs, outputs) replaces the manifest's I/O description the Model checks feeds against.

_BACKENDS: "dict[str, type]" = {}
_FIND_BACKEND: "Callable[[str], None] | None" = None  # set at build time (edgeexport.targets) to import a target's backend on first use


def backend(target):
    def register(cls):
        _BACKENDS[target] = cls
        return cls
    return register


def backend_for(target):
    if target not in _BACKENDS and _FIND_BACKEND is not None:
        _FIND_BACKEND(target)
    if target not in _BACKENDS:
        raise BundleError(f"this loader cannot run {target!r} bundles (it was assembled for "
                          f"{', '.join(sorted(_BACKENDS)) or 'no backend'}): use the loader.py inside that bundle")
    return _BACKENDS[target]


def timing_options(manifest, options=None):
    """The backend options to time a bundle with: its backend's ``timing_options`` (the kernels the device runs,
    where ``load()``'s default runs something else on this machine), under the ones given."""
    cls = backend_for(manifest["target"])
    given = {k: v for k, v in (options or {}).items() if v is not None}
    return {**{k: v for k, v in getattr(cls, "timing_options", {}).items() if k in cls.options}, **given}


class Model:
    """A verified, loaded bundle. Call it with a dict of arrays (or one array for a one-input model)."""

    def __init__(self, root, manifest, backend):
        self.root = Path(root)
        self.manifest = manifest
        self.inputs = manifest["inputs"]
        self.outputs = manifest["outputs"]
        self._backend = backend
        self._tokenizer = None
        self._decoder = None
        self._state = None
        self._pairs = (manifest.get("state") or {}).get("pairs") or {}

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

    def tokenize(self, text):
        """A string -> its token ids, with the bundle's tokenizer (a decoder's: no truncation or padding)."""
        text_settings_ = self.manifest.get("text")
        if not text_settings_:
            raise InputError("this bundle has no tokenizer")
        if not isinstance(text, str):
            raise InputError(f"the prompt must be a string, not {type(text).__name__}")
        if self._tokenizer is None:
            self._tokenizer = make_tokenizer(_safe_path(self.root, text_settings_["tokenizer"]), text_settings_)
        return self._tokenizer.encode(text).ids

    def decoder(self):
        """The KV-cache decoder over this bundle's session (decoder bundles only)."""
        gen = self.manifest.get("generation")
        if not gen:
            raise InputError("this bundle is not a text-generation decoder (built without --task text-generation)")
        if self._decoder is None:
            session = getattr(self._backend, "session", None)
            if session is None:
                raise BundleError(f"{self.manifest['target']} bundles cannot generate: generation needs onnxruntime")
            self._decoder = KVDecoder(session, context=gen["context"])
        return self._decoder

    def generate(self, prompt, max_new_tokens=32, temperature=0.0, top_k=0, seed=None, stop=True):
        """Continue ``prompt`` (a string) by up to ``max_new_tokens`` tokens and return the new text: greedy at
        temperature 0, else sampled at that temperature from the ``top_k`` likeliest tokens (0: all), reproducibly
        with ``seed``. Stops at the model's end-of-text token unless ``stop`` is False. The KV cache stays in numpy
        between steps; a prompt longer than the model's context is refused."""
        self.decoder()  # a bundle that is not a decoder says so before anything else
        ids = self.generate_ids(self.tokenize(prompt), max_new_tokens, temperature, top_k, seed, stop)
        return self._tokenizer.decode(ids)

    def generate_ids(self, prompt_ids, max_new_tokens=32, temperature=0.0, top_k=0, seed=None, stop=True):
        """Like generate(), on token ids: returns the new token ids."""
        dec = self.decoder()
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
            raise InputError(f"max_new_tokens must be an integer, not {max_new_tokens!r}")
        stops = self.manifest["generation"].get("stop_ids") or [] if stop else []
        return dec.generate(list(prompt_ids), max_new_tokens, float(temperature), int(top_k), stops, seed)

    def __call__(self, inputs):
        if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)):
            feeds = self.encode(inputs)
            if all(isinstance(i["shape"][0], str) for i in self.inputs):
                return self._backend.run(self.check_inputs(feeds))
            rows = [self._backend.run(self.check_inputs({k: v[j:j + 1] for k, v in feeds.items()}))
                    for j in range(len(next(iter(feeds.values()))))]
            return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        return self._backend.run(self.check_inputs(inputs))

    def reset(self, state=None):
        """Start a new stream of a stateful model: its state inputs go back to zeros (or to ``state``, a dict of
        arrays keyed by state input)."""
        if not self._pairs:
            raise InputError("this model has no recurrent state (its manifest declares no state pairs)")
        initial = self.manifest["state"]["initial"]
        zeros = {name: np.zeros(initial[name]["shape"], dtype=self._dtype(name)) for name in self._pairs}
        if state is not None:
            unknown = sorted(set(state) - set(self._pairs))
            if unknown:
                raise InputError(f"{unknown} are not state inputs; the state inputs are {sorted(self._pairs)}")
            zeros.update({k: np.asarray(v) for k, v in state.items()})
        self._state = zeros

    def stream(self, inputs):
        """One step of a stateful model (a chunk of audio, a frame): pass the inputs other than the state; the state
        the model returned on the previous step is fed back (zeros after reset()). Returns every output."""
        if not self._pairs:
            raise InputError("this model has no recurrent state: call it directly, model(inputs)")
        if isinstance(inputs, np.ndarray):
            free = [i["name"] for i in self.inputs if i["name"] not in self._pairs]
            if len(free) != 1:
                raise InputError(f"this model takes {free} besides its state; pass a dict keyed by input name")
            inputs = {free[0]: inputs}
        if not isinstance(inputs, dict):
            raise InputError(f"inputs must be a dict of numpy arrays (or one array), not {type(inputs).__name__}")
        given = sorted(set(inputs) & set(self._pairs))
        if given:
            raise InputError(f"stream() feeds the state itself; drop {given} (or use reset(state=...))")
        if self._state is None:
            self.reset()
        out = self(dict(inputs, **self._state))
        self._state = {i: np.asarray(out[o]).reshape(self._state[i].shape).astype(self._state[i].dtype, copy=False)
                       for i, o in self._pairs.items()}
        return out

    def _dtype(self, name):
        return next(i["dtype"] for i in self.inputs if i["name"] == name)

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
        declared = {o["name"] for o in self.outputs}
        for n, (ins, expected) in enumerate(self.golden()):
            if set(expected) != declared:
                raise BundleError(f"golden pair {n} holds outputs {sorted(expected)} but the manifest declares "
                                  f"{sorted(declared)}: the manifest was edited, or the bundle is not whole")
            got = self(ins)
            missing = declared - set(got)
            if missing:
                raise BundleError(f"the model does not produce the output(s) {sorted(missing)} its manifest declares")
            for spec in self.outputs:
                value = np.asarray(got[spec["name"]])
                shape = spec["shape"]
                if value.ndim != len(shape) or any(type(d) is int and d != v for d, v in zip(shape, value.shape)) \
                        or (spec["dtype"] in _NUMPY_DTYPES and str(value.dtype) != spec["dtype"]):
                    raise BundleError(f"output {spec['name']!r} is {value.dtype} {list(value.shape)} but the manifest "
                                      f"declares {spec['dtype']} {shape}: the manifest was edited, or the bundle is "
                                      "not whole")
            ok &= _matches(f"golden {n}", got, expected, tol, verbose)
        if self.manifest.get("generation"):
            ok &= self._golden_continuations(verbose)
        if self._pairs:  # the golden pairs are consecutive steps of one stream: replay them through stream()
            pairs = list(self.golden())
            self.reset({i: pairs[0][0][i] for i in self._pairs})
            for n, (ins, expected) in enumerate(pairs):
                got = self.stream({k: v for k, v in ins.items() if k not in self._pairs})
                ok &= _matches(f"golden stream step {n}", got, expected, tol, verbose)
            self._state = None
        return ok


    def _golden_continuations(self, verbose):
        """Each golden prompt's greedy continuation, token by token. Where this machine's arithmetic picks another
        token at a near-tie (the two logits within the manifest's margin), the rest is not comparable: that
        continuation passes up to there, and the step is reported."""
        gen = self.manifest["generation"]
        margin = float(gen["golden_logit_margin"])
        dec, ok = self.decoder(), True
        for n, g in enumerate(gen["golden"]):
            prompt, want = list(g["prompt_ids"]), list(g["continuation_ids"])
            got = self.generate_ids(prompt, len(want), stop=False)
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
            good, why = first is None, ""
            if first is not None:  # teacher-force the golden tokens up to there: a near-tie is not a failure
                logits, _ = dec.step(np.asarray([prompt + want[:first]]), dec.empty())
                last = logits[0, -1]
                gap = float(last.max() - last[want[first]])
                good = gap <= margin
                why = (f"differs at token {first}: a near-tie (golden token {gap:.3g} below the top logit, margin "
                       f"{margin:g})" if good else f"differs at token {first}: the golden token is {gap:.3g} below "
                       f"the top logit (margin {margin:g})")
            ok &= good
            if verbose:
                print(f"golden continuation {n}: {len(want)} tokens {'ok' if good else 'MISMATCH'}"
                      + (f" ({why})" if why else ""))
        return ok


def _matches(what, got, expected, tol, verbose):
    ok = True
    for name, want in expected.items():
        out = np.asarray(got[name], dtype=np.float64).ravel()
        ref = np.asarray(want, dtype=np.float64).ravel()
        err = float(np.max(np.abs(out - ref))) if ref.size and out.shape == ref.shape else float("inf")
        denom = float(np.linalg.norm(out) * np.linalg.norm(ref))
        cos = float(np.dot(out, ref) / denom) if denom > 0 and out.shape == ref.shape else float(np.allclose(out, ref))
        atol = tol["atol"].get(name, 0.0)
        good = out.shape == ref.shape and err <= atol and cos >= tol["min_cosine"]
        ok &= good
        if verbose:
            print(f"{what} {name}: max_abs {err:.3g} (<= {atol:.3g}), cosine {cos:.6f} "
                  f"(>= {tol['min_cosine']}) {'ok' if good else 'MISMATCH'}")
    return ok


def load(root=None, providers=None, threads=None, verify_files=True, **options):
    """Verify the bundle at ``root`` (default: this file's folder; a folder or a .tar.gz/.zip archive) and load it.

    ``providers`` and ``threads`` go to the runtime where it takes them; other keyword ``options`` are the backend's
    own (``python loader.py --help`` lists them; a value of None means "not given")."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent
    archive = None
    if is_archive(root):  # extracted (safely) into a private temporary folder, removed when the process exits
        archive, root = root, extract_archive(root)
    manifest = read_manifest(root)
    if verify_files:
        verify(root, manifest)
    target = manifest["target"]
    cls = backend_for(target)
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        takes = f"; they take {', '.join(sorted(cls.options))}" if cls.options else "; they take none"
        raise BundleError(f"option(s) {', '.join(unknown)} do not apply to {target} bundles{takes}")
    backend_obj = cls(_safe_path(root, manifest["model_file"]), manifest, root=root, archive=archive,
                      providers=providers, threads=threads, **options)
    model = Model(root, manifest, backend_obj)
    io = getattr(backend_obj, "io", None)  # a backend may present another layout (TFLite's layout='native')
    if io:
        model.inputs, model.outputs = io
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description="Verify and self-test an edgeexport bundle.")
    parser.add_argument("--bundle", default=None,
                        help="bundle folder or archive (.tar.gz, .zip) (default: this file's folder)")
    parser.add_argument("--selftest", action="store_true", help="run the golden input/output pairs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--providers", default=None, help="comma-separated execution providers (onnxruntime)")
    names = set()
    for cls in _BACKENDS.values():  # each backend's own load() options, as flags
        for name, (flag_help, choices) in cls.options.items():
            if name not in names:
                names.add(name)
                parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, choices=choices,
                                    help=flag_help)
    args = parser.parse_args(argv)
    try:
        model = load(args.bundle, providers=args.providers.split(",") if args.providers else None, threads=args.threads,
                     **{name: getattr(args, name) for name in names})
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"verified {model!r}")
    if args.selftest:
        try:
            passed = model.selftest()
        except (BundleError, InputError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not passed:
            print("selftest FAILED: outputs differ from the golden pairs", file=sys.stderr)
            return 1
        print("selftest passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
