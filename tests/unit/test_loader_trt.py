"""The loader's TensorRT decisions, tested without TensorRT: calibration cache text, device compatibility, engine
fit, cache keys and the atomic, locked engine cache. (The thin code that calls TensorRT is in tests marked trt.)"""

import threading
import time

import pytest

from edgeexport.targets.trt import backend as loader

ORIN = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7", "dla_cores": 2}
RTX = {"tensorrt": "10.3.0", "gpu": "NVIDIA GeForce RTX 3090", "compute_capability": "8.6", "dla_cores": 0}
BUILDER = {"workspace_mb": 1024, "timing_cache": True, "dla_core": None, "gpu_fallback": True,
           "hardware_compatibility": "none", "version_compatible": False, "profiles": {}}


def cfg(**kw):
    base = {"precision": "int8", "int8_path": "explicit", "builder": dict(BUILDER), "tensorrt_majors": [10, 11]}
    base.update(kw)
    return base


def test_version_ints_follow_tensorrt_headers():
    assert loader.trt_version_int("8.6.1") == 8601
    assert loader.trt_version_int("10.3.0") == 100300
    assert loader.trt_version_int("11.4.1.post2") == 110401


def test_calibration_cache_roundtrip_and_format():
    scales = {"image": 0.0078125, "/conv1/Conv_output_0": 0.031, "x.y": 1e-3}
    text = loader.write_calibration_cache(scales, "10.3.0")
    lines = text.splitlines()
    assert lines[0] == "TRT-100300-EntropyCalibration2"
    assert "image: 3c000000" in lines  # 1/128 as the hex of its float32 bits
    header, back = loader.read_calibration_cache(text)
    assert header == lines[0] and set(back) == set(scales)
    assert all(abs(back[k] - v) <= 1e-7 * v for k, v in scales.items())


@pytest.mark.parametrize("text,match", [
    ("", "header"),
    ("garbage\nx: 3c000000\n", "header"),
    ("TRT-100300-EntropyCalibration2\nx 3c000000\n", "malformed"),
    ("TRT-100300-EntropyCalibration2\nx: zzzzzzzz\n", "malformed"),
    ("TRT-100300-EntropyCalibration2\nx: bf800000\n", "not a positive"),  # -1.0
    ("TRT-100300-EntropyCalibration2\nx: 7fc00000\n", "not a positive"),  # NaN
])
def test_malformed_calibration_cache_is_refused(text, match):
    with pytest.raises(loader.BundleError, match=match):
        loader.read_calibration_cache(text)


def test_compatible_device_has_no_problems():
    assert loader.trt_compat_problems(cfg(), ORIN) == []
    assert loader.trt_compat_problems(cfg(), dict(ORIN, tensorrt="11.1.0")) == []


def test_compat_problems_say_exactly_what_mismatches():
    old = loader.trt_compat_problems(cfg(), dict(ORIN, tensorrt="8.6.2"))
    assert old == ["this bundle needs TensorRT 10.x or 11.x; this device has TensorRT 8.6.2 (JetPack 6 ships "
                   "TensorRT 10)"]
    implicit = loader.trt_compat_problems(cfg(int8_path="implicit", tensorrt_majors=[10]), dict(RTX, tensorrt="11.0.0"))
    assert any("implicit INT8 calibration" in p and "TensorRT 11 removed" in p and "int8_path=explicit" in p
               for p in implicit)
    weak = loader.trt_compat_problems(cfg(), dict(RTX, gpu="Tegra X1", compute_capability="5.3"))
    assert weak == ["int8 needs compute capability >= 6.1; Tegra X1 has 5.3"]
    dla = cfg(builder=dict(BUILDER, dla_core=0, gpu_fallback=False))
    assert "DLA core 0 without GPU fallback" in loader.trt_compat_problems(dla, RTX)[0]
    assert loader.trt_compat_problems(dla, ORIN) == []


def test_engine_fit_names_gpu_and_version():
    assert loader.engine_fit_problems(ORIN, ORIN, BUILDER) == []
    gpu = loader.engine_fit_problems(RTX, ORIN, BUILDER)
    assert gpu == ["the engine was built for NVIDIA GeForce RTX 3090 (compute 8.6); this device is Orin (compute 8.7)"]
    version = loader.engine_fit_problems(ORIN, dict(ORIN, tensorrt="10.7.0"), BUILDER)
    assert version == ["TensorRT 10.7.0 here, the engine was built with 10.3.0"]
    vc = dict(BUILDER, version_compatible=True)
    assert loader.engine_fit_problems(ORIN, dict(ORIN, tensorrt="10.7.0"), vc) == []
    assert loader.engine_fit_problems(ORIN, dict(ORIN, tensorrt="11.0.0"), vc)  # not across majors
    hc = dict(BUILDER, hardware_compatibility="ampere+")
    assert loader.engine_fit_problems(RTX, dict(RTX, gpu="NVIDIA A100", compute_capability="8.0"), hc) == []
    assert "Ampere and newer" in loader.engine_fit_problems(RTX, dict(RTX, gpu="T4", compute_capability="7.5"), hc)[0]


def test_cache_key_separates_what_an_engine_is_tied_to():
    keys = {loader.engine_cache_key("ab" * 32, d, p, b) for d, p, b in [
        (ORIN, "int8", BUILDER), (RTX, "int8", BUILDER), (dict(ORIN, tensorrt="10.7.0"), "int8", BUILDER),
        (ORIN, "fp16", BUILDER), (ORIN, "int8", dict(BUILDER, dla_core=0))]}
    assert len(keys) == 5
    assert all("/" not in k and " " not in k for k in keys)


def test_default_engine_cache_is_beside_the_bundle(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEEXPORT_ENGINE_CACHE", raising=False)
    assert loader.default_engine_cache(tmp_path / "bundle") == tmp_path / "bundle.engines"
    monkeypatch.setenv("EDGEEXPORT_ENGINE_CACHE", str(tmp_path / "elsewhere"))
    assert loader.default_engine_cache(tmp_path / "bundle") == tmp_path / "elsewhere"


class Builder:
    def __init__(self, plan=b"PLAN" * 100, delay=0.0, fail=False):
        self.calls, self.plan, self.delay, self.fail = 0, plan, delay, fail

    def __call__(self):
        self.calls += 1
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("builder crashed midway")
        return self.plan, {"device": ORIN}


def test_engine_cache_builds_once_then_reuses(tmp_path):
    b = Builder()
    logs = []
    plan, path, built = loader.cached_engine(tmp_path, "k", b, logs.append)
    assert (plan, built, b.calls) == (b.plan, True, 1) and path.read_bytes() == b.plan
    assert loader.cached_engine(tmp_path, "k", b, logs.append)[2] is False and b.calls == 1
    # the plan is a plain TensorRT plan: byte for byte what the builder returned, nothing prefixed
    assert (tmp_path / "k.plan").read_bytes() == b.plan


def test_corrupt_or_half_written_entry_is_rebuilt(tmp_path):
    b = Builder()
    loader.cached_engine(tmp_path, "k", b)
    (tmp_path / "k.plan").write_bytes(b"PLAN")  # truncated
    logs = []
    plan, _, built = loader.cached_engine(tmp_path, "k", b, logs.append)
    assert built and plan == b.plan and b.calls == 2 and "corrupt" in logs[0]
    (tmp_path / "k.json").unlink()  # plan written, record not yet: not a complete entry
    assert loader.cached_engine(tmp_path, "k", b, logs.append)[2] and b.calls == 3


def test_failed_build_leaves_no_entry_and_no_temporaries(tmp_path):
    with pytest.raises(RuntimeError, match="crashed"):
        loader.cached_engine(tmp_path, "k", Builder(fail=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.lock"]


def test_concurrent_loads_build_the_engine_once(tmp_path):
    b = Builder(delay=0.3)
    results = []
    threads = [threading.Thread(target=lambda: results.append(loader.cached_engine(tmp_path, "k", b, lambda m: None)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b.calls == 1 and [r[0] for r in results] == [b.plan] * 4 and sum(r[2] for r in results) == 1


def test_missing_tensorrt_is_named():
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(loader.BundleError, match="TensorRT is not installed here.*JetPack"):
        loader.trt_device()
