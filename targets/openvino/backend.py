"""OpenVINO bundles on the device: the shipped loader's backend.

Build time imports this module (the runner that validates a build uses it); bundle time appends everything below
the "backend" marker to the loader core (edgeexport/bundle/loader.py) to make the bundle's one-file loader.py, so
it may import only the standard library, numpy and its runtime.
"""

from edgeexport.bundle.loader import INT8_KERNELS, BundleError, backend, int8_kernel_choice, warn_if_older  # noqa: F401

# ---- backend: appended to the loader core --------------------------------------------------------------------
import sys
import threading

import numpy as np


@backend("openvino")
class OpenvinoBackend:
    """Compiles the bundle's IR (model.xml + model.bin) for an OpenVINO device and runs it.

    The compute precision is pinned to what the build validated (``runtime_config.inference_precision``): the CPU
    plugin otherwise picks bfloat16 by itself on CPUs that have it, and an fp32 bundle would silently run in bf16."""

    runtime = "openvino"
    options = {"device": ("OpenVINO: the device to compile for: CPU (default), GPU, NPU, AUTO", None),
               "int8_kernels": ("int8 bundles on the CPU: auto (run the FakeQuantize graph exactly where this CPU's "
                                "int8 kernels would saturate 8-bit weights), native (the plugin's int8 kernels), "
                                "exact (FakeQuantize in float, slower)", list(INT8_KERNELS))}
    #: what bench and compare time: the int8 kernels the device runs (see the ONNX Runtime backend)
    timing_options = {"int8_kernels": "native"}

    def __init__(self, model_path, manifest, root=None, archive=None, providers=None, threads=None, device="CPU",
                 int8_kernels=None):
        if providers:
            raise BundleError("execution providers are an onnxruntime setting; OpenVINO bundles take device= "
                              "(CPU, GPU, NPU, AUTO) and threads")
        try:
            import openvino as ov
        except ImportError:
            raise BundleError("this bundle needs OpenVINO: pip install -r requirements.txt") from None
        warn_if_older("openvino", ov.__version__, manifest)
        core = ov.Core()
        available = core.available_devices
        if device.split(".")[0] not in available and not device.startswith(("AUTO", "HETERO", "MULTI")):
            raise BundleError(f"OpenVINO device {device!r} is not available here; available: {available}")
        config = {}
        precision = (manifest.get("runtime_config") or {}).get("inference_precision", {}).get(device.split(".")[0])
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        exact = False
        if device.split(".")[0] == "CPU":
            exact, warning = int8_kernel_choice(manifest, int8_kernels)
            if warning:
                print(warning, file=sys.stderr)
            if exact:  # no low-precision transformations: FakeQuantize runs as written, in float
                config["LP_TRANSFORMS_MODE"] = "NO"
        elif int8_kernels == "exact":
            raise BundleError("int8_kernels='exact' applies to the CPU device")
        self.int8_kernels = "exact" if exact else "native"
        try:
            self.compiled = core.compile_model(str(model_path), device, config)
        except Exception as e:
            raise BundleError(f"OpenVINO {ov.__version__} cannot compile the model for {device}: "
                              f"{str(e).strip()[:300]}") from None
        self.device = device
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self.request = self.compiled.create_infer_request()
        self.lock = threading.Lock()  # one infer request: one call at a time

    def run(self, feeds):
        with self.lock:
            result = self.request.infer(feeds)
            return {name: np.array(result[out]) for name, out in zip(self.output_names, self.compiled.outputs)}
