"""TensorRT bundles on the device: the shipped loader's backend.

Build time imports this module (the runners that validate a build use it); bundle time appends everything below
the "backend" marker to the loader core (edgeexport/bundle/loader.py) to make the bundle's one-file loader.py, so
it may import only the standard library, numpy and its runtime.
"""

from edgeexport.bundle.loader import BundleError, OnnxSession, _safe_path, _sha256, _version_tuple, backend  # noqa: F401

# ---- backend: appended to the loader core --------------------------------------------------------------------

# The code that talks to TensorRT is kept thin (trt_device, _trt_build_engine, _TrtSession); the decisions around it
# (compatibility, cache keys, the atomic engine cache, calibration cache text) are plain Python, tested without it.
import hashlib
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np

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


@backend("trt")
class TrtBackend:
    """Checks the device against the manifest, then runs the bundle's prebuilt engine when it fits this device, or
    builds one from the bundle's ONNX on first load and caches it (see :func:`cached_engine`).

    ``engine``: 'auto' (prebuilt if it fits, else build and cache), 'prebuilt' (refuse to build), 'rebuild'.
    ``runtime='onnxruntime'`` runs the bundle's ONNX on onnxruntime instead, exactly as the build validated it (for
    checking a bundle on a machine without a GPU)."""

    runtime = "tensorrt"
    options = {
        "engine": ("TensorRT: use the bundle's engine if it fits, else build and cache one (auto)",
                   ["auto", "prebuilt", "rebuild"]),
        "engine_cache": ("TensorRT: engine cache folder [<bundle>.engines]", None),
        "engine_file": ("TensorRT: run this plan (e.g. from build_engine.sh)", None),
        "runtime": ("TensorRT bundles: run the ONNX on onnxruntime instead (no GPU needed)", ["onnxruntime"]),
    }

    def __init__(self, model_path, manifest, root=None, archive=None, providers=None, threads=None, engine="auto",
                 engine_cache=None, engine_file=None, runtime=None, log=None):
        self.output_names = [o["name"] for o in manifest["outputs"]]
        if runtime is not None:
            if runtime != "onnxruntime":
                raise BundleError(f"runtime={runtime!r}: TensorRT bundles run on TensorRT or on 'onnxruntime'")
            self.runtime = "onnxruntime"
            self.session = OnnxSession(model_path, manifest, providers=providers, threads=threads)
            return
        if engine not in ("auto", "prebuilt", "rebuild"):
            raise BundleError(f"engine={engine!r}: use 'auto', 'prebuilt' or 'rebuild'")
        if providers:
            raise BundleError("providers are onnxruntime settings; TensorRT bundles take none (add "
                              "runtime='onnxruntime' to run the ONNX on onnxruntime)")
        # threads: a CPU setting; TensorRT runs on the GPU and ignores it (it applies to runtime='onnxruntime')
        cache_dir = engine_cache if engine_cache is not None else default_engine_cache(archive) if archive else None
        log = log or (lambda msg: print(msg, file=sys.stderr))
        cfg = manifest["runtime_config"]["trt"]
        try:
            device = trt_device()
        except BundleError as e:  # where this machine cannot run TensorRT: say how to check the bundle anyway
            raise BundleError(f"{e}. To check the ONNX this bundle builds from on onnxruntime instead (not "
                              "TensorRT's numbers): --runtime onnxruntime (loader.py, edgeexport verify/bench), "
                              "or load(..., runtime='onnxruntime')") from None
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
