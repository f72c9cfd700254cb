#!/usr/bin/env python3
"""edgeexport bundle loader: one file, needs only numpy and the target runtime (never torch).

    from loader import load
    model = load("path/to/bundle")          # verifies checksums and versions first
    outputs = model({"image": x})            # dict in, dict out (a single array is fine for one-input models)

    python loader.py --selftest              # runs the golden input/output pairs; exit 0 = pass

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
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise BundleError(f"manifest schema_version {manifest['schema_version']!r} is not supported by this loader "
                          f"(it reads version {SCHEMA_VERSION}); rebuild the bundle or use its own loader.py")
    if not isinstance(manifest["files"], list) or not all(isinstance(f, dict) for f in manifest["files"]):
        raise BundleError("manifest.json 'files' must be a list of objects")
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


_BACKENDS = {"ort": _OrtBackend, "tflite": _TfliteBackend}


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


def load(root=None, providers=None, threads=None, verify_files=True, layout="model"):
    """Verify the bundle at ``root`` (default: this file's folder) and load it.

    ``layout='native'`` (TFLite) feeds and returns tensors in the runtime's own layout (e.g. NHWC), skipping the
    transposes; the default takes and returns the layout the PyTorch model used."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent
    manifest = read_manifest(root)
    if verify_files:
        verify(root, manifest)
    target = manifest["target"]
    if target not in _BACKENDS:
        raise BundleError(f"this loader cannot run target {target!r}; it knows {sorted(_BACKENDS)}")
    model_path = _safe_path(root, manifest["model_file"])
    if target == "tflite":
        backend = _TfliteBackend(model_path, manifest, providers=providers, threads=threads, layout=layout)
    elif layout != "model":
        raise BundleError(f"layout={layout!r} applies to TFLite bundles only")
    else:
        backend = _BACKENDS[target](model_path, manifest, providers=providers, threads=threads)
    model = Model(root, manifest, backend)
    if layout == "native":
        model.inputs = manifest["runtime_config"]["native_inputs"]
        model.outputs = manifest["runtime_config"]["native_outputs"]
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description="Verify and self-test an edgeexport bundle.")
    parser.add_argument("--bundle", default=None, help="bundle folder (default: this file's folder)")
    parser.add_argument("--selftest", action="store_true", help="run the golden input/output pairs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--providers", default=None, help="comma-separated execution providers")
    args = parser.parse_args(argv)
    try:
        model = load(args.bundle, providers=args.providers.split(",") if args.providers else None, threads=args.threads)
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
