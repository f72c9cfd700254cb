"""ONNX Runtime bundles on the device: the shipped loader's backend.

Build time imports this module (the runners that validate a build use it); bundle time appends everything below
the "backend" marker to the loader core (edgeexport/bundle/loader.py) to make the bundle's one-file loader.py, so
it may import only the standard library, numpy and its runtime.
"""

from edgeexport.bundle.loader import INT8_KERNELS, OnnxSession, backend, int8_kernel_choice  # noqa: F401

# ---- backend: appended to the loader core --------------------------------------------------------------------
import sys

#: how to build for a CPU whose int8 kernels saturate 8-bit weights
INT8_FIX = "rebuild with --option device=x86-avx2 (7-bit weights)"


@backend("ort")
class OrtBackend(OnnxSession):
    options: dict = {"int8_kernels": ("int8 bundles: auto (run the Q/DQ graph exactly where this CPU's int8 kernels "
                                      "would saturate 8-bit weights), native (onnxruntime's int8 kernels), exact "
                                      "(Q/DQ pairs as written, slower)", list(INT8_KERNELS))}
    #: what bench and compare time: the int8 kernels the device runs (on a CPU where they saturate, only the speed
    #: is meaningful; outputs are checked with int8_kernels='exact')
    timing_options: dict = {"int8_kernels": "native"}

    def __init__(self, model_path, manifest, root=None, archive=None, providers=None, threads=None,
                 int8_kernels=None):
        exact, warning = int8_kernel_choice(manifest, int8_kernels, INT8_FIX)
        if warning:
            print(warning, file=sys.stderr)
        super().__init__(model_path, manifest, providers=providers, threads=threads, exact=exact)
        self.int8_kernels = "exact" if exact else "native"
