"""TFLite/LiteRT bundles on the device: the shipped loader's backend.

Build time imports this module (the runners that validate a build use it); bundle time appends everything below
the "backend" marker to the loader core (edgeexport/bundle/loader.py) to make the bundle's one-file loader.py, so
it may import only the standard library, numpy and its runtime.
"""

from edgeexport.bundle.loader import BundleError, backend  # noqa: F401

# ---- backend: appended to the loader core --------------------------------------------------------------------

import threading

import numpy as np


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


@backend("tflite")
class TfliteBackend:
    """Runs a .tflite through its signature. Hides the layout (NHWC inside, the model's layout outside unless
    layout='native') and int8/uint8 I/O (float in, float out). One lock: a TFLite interpreter is not thread-safe."""

    options = {"layout": ("model (the PyTorch model's layout, default) or native (the runtime's own, e.g. NHWC)",
                          ["model", "native"])}

    def __init__(self, model_path, manifest, root=None, archive=None, providers=None, threads=None, layout="model"):
        if layout not in ("model", "native"):
            raise BundleError(f"layout={layout!r}: use 'model' or 'native'")
        if providers:
            raise BundleError("execution providers are an onnxruntime setting; TFLite bundles take threads only")
        interpreter_cls, self.runtime = _litert_interpreter()
        self.interp = interpreter_cls(model_path=str(model_path), num_threads=int(threads) if threads else None)
        self.runner = self.interp.get_signature_runner()
        self.in_details = self.runner.get_input_details()
        self.out_details = self.runner.get_output_details()
        cfg = (manifest.get("runtime_config") or {})
        self.in_perm = {} if layout == "native" else cfg.get("input_perm", {})
        self.out_perm = {} if layout == "native" else cfg.get("output_perm", {})
        self.lock = threading.Lock()
        self.io = (cfg["native_inputs"], cfg["native_outputs"]) if layout == "native" else None
        # files from litert-torch name their signature args_0../output_0..: the manifest maps the model's names
        sig = cfg.get("signature") or {}
        self.sig_in, self.sig_out = sig.get("inputs") or {}, {v: k for k, v in (sig.get("outputs") or {}).items()}

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
            key = self.sig_in.get(name, name)
            d = self.in_details[key]
            if x.ndim == 0 and list(d["shape"]) == [1]:  # a scalar input the converter made [1] (litert-torch)
                x = x.reshape(1)
            if d["dtype"] in (np.int8, np.uint8) and x.dtype.kind == "f":
                x = self._quantize(x, d)
            elif x.dtype.kind in "iu" and x.dtype != d["dtype"]:  # e.g. token ids: int64 in, int32 in the file
                info = np.iinfo(d["dtype"])
                if x.size and (x.min() < info.min or x.max() > info.max):
                    raise BundleError(f"input {name!r} holds values outside {np.dtype(d['dtype']).name}, the "
                                      "dtype the .tflite takes")
                x = x.astype(d["dtype"])
            args[key] = np.ascontiguousarray(x)
        with self.lock:
            out = self.runner(**args)
        result = {}
        for key, y in out.items():
            name = self.sig_out.get(key, key)
            d = self.out_details[key]
            if d["dtype"] in (np.int8, np.uint8):
                scale, zero = d["quantization"]
                y = ((y.astype(np.float32) - zero) * scale).astype(np.float32)
            if name in self.out_perm:
                y = np.transpose(y, self.out_perm[name])
            result[name] = np.array(y)
        return result
