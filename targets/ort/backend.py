"""ONNX Runtime bundles on the device: the shipped loader's backend.

Build time imports this module (the runners that validate a build use it); bundle time appends everything below
the "backend" marker to the loader core (edgeexport/bundle/loader.py) to make the bundle's one-file loader.py, so
it may import only the standard library, numpy and its runtime.
"""

from edgeexport.bundle.loader import OnnxSession, backend  # noqa: F401

# ---- backend: appended to the loader core --------------------------------------------------------------------


@backend("ort")
class OrtBackend(OnnxSession):
    options: dict = {}

    def __init__(self, model_path, manifest, root=None, archive=None, providers=None, threads=None):
        super().__init__(model_path, manifest, providers=providers, threads=threads)
