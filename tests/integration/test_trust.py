"""Results a user can trust: fair, honest timings; refusals before any work; every error (and --json) without a
traceback; edited manifests refused; bundles readable by others."""

import copy
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from edgeexport import bench
from edgeexport.bundle import loader


# ---- timings ---------------------------------------------------------------------------------------------------

def _summary(p50, p90, rounds):
    return {"p50_ms": p50, "p90_ms": p90, "round_p50_ms": rounds}


def test_a_steady_timing_supports_its_ratio():
    got = bench.speedup(_summary(10.0, 10.5, [10.0, 10.1, 9.9]), _summary(2.0, 2.1, [2.0, 2.02, 1.98]))
    assert got["supported"] and got["noise"] is None and got["speedup"] == pytest.approx(5.0)
    assert bench.format_speedup(got) == "5.00x"


@pytest.mark.parametrize("ref,built,why", [
    (_summary(0.094, 88.8, [0.09, 0.1, 0.09]), _summary(0.01, 0.011, [0.01] * 3), "reference: p90 is"),
    (_summary(10.0, 10.2, [10.0, 30.0, 10.0]), _summary(2.0, 2.1, [2.0] * 3), "round medians differ"),
    (_summary(10.0, 10.2, [10.0, 11.0, 12.0]), _summary(2.0, 2.1, [2.0, 1.0, 3.0]), "ranged"),
])
def test_a_spread_that_does_not_support_a_ratio_is_reported_not_printed(ref, built, why):
    """The report's old reference row (p50 0.094 ms next to p99 88.8 ms) and round-to-round swings give no ratio."""
    got = bench.speedup(ref, built)
    assert not got["supported"] and why in got["noise"]
    assert bench.format_speedup(got) == "noisy"


def test_rounds_that_disagree_moderately_print_the_ratio_with_its_range():
    got = bench.speedup(_summary(10.0, 10.5, [10.0, 11.0, 12.0]), _summary(2.0, 2.1, [2.0, 1.6, 2.4]))
    assert got["supported"] and got["range"] == pytest.approx([5.0, 6.875])
    assert bench.format_speedup(got) == "5-6.9x"


def test_an_accuracy_drop_of_two_samples_in_two_hundred_is_exactly_one_point():
    from edgeexport.validate import compare

    labels = np.arange(200) % 10
    ref = [np.eye(10, dtype=np.float32)[[y]] for y in labels]
    out = [r.copy() for r in ref]
    for i in (3, 7):  # two samples the built model gets wrong
        out[i] = np.eye(10, dtype=np.float32)[[(labels[i] + 1) % 10]]
    report = compare({"output": ref}, {"output": out}, {"accuracy_drop": 1.0}, labels)
    assert report.task["drop_points"] == 1.0 and report.passed


def test_interleaved_rounds_time_every_variant_in_every_round():
    calls = []
    out = bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, runs=3,
                            rounds=2)
    assert calls == ["a"] * 4 + ["b"] * 4 + ["a"] * 4 + ["b"] * 4  # a, b, a, b: rounds interleave the variants
    assert len(out["a"]["round_p50_ms"]) == 2 and out["a"]["runs"] == 6


def test_threads_default_to_the_cpus_this_process_may_use():
    n = bench.available_cpus()
    assert 1 <= n <= (os.cpu_count() or n)
    if hasattr(os, "sched_getaffinity"):
        assert n <= len(os.sched_getaffinity(0))
    assert bench.resolve_threads(None) == n and bench.resolve_threads(3) == 3


def test_build_times_reference_and_bundle_with_the_same_threads_in_rounds(digits_npz, tmp_path):
    import torch

    from tests.conftest import make_cfg, quiet_build

    result = quiet_build(make_cfg(model="edgeexport.models.digits:model", precision="fp32", out=str(tmp_path / "b"),
                                  calibration={"path": str(digits_npz)}, bench={"runs": 20, "warmup": 2}))
    b = result.manifest["benchmark"]
    assert b["threads"] == bench.available_cpus() == torch.get_num_threads()  # PyTorch got the runtime's count
    assert b["rounds"] == 3 and len(b["reference"]["round_p50_ms"]) == 3 and len(b["speedup_by_round"]) == 3
    assert isinstance(b["speedup_supported"], bool) and (b["noise"] is None) == b["speedup_supported"]


def test_training_runs_with_the_available_cpus_and_restores_torch_threads():
    import torch

    from edgeexport.util import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# ---- refusals before any work, and no tracebacks ----------------------------------------------------------------

def test_an_output_path_that_cannot_be_written_is_refused_before_the_model_loads(cli, tiny_model, tiny_npz,
                                                                                 tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out in (blocker / "bundle", Path("/proc/edgeexport-no-such-dir/bundle")):
        r = cli("build", "--model", f"{tiny_model}:build", "--calib", tiny_npz, "--precision", "fp32", "--out", out)
        assert r.exit_code == 1 and "cannot be written" in r.stderr and "Traceback" not in r.stderr
        assert "==> loading model" not in r.stderr  # refused before any work


def test_json_always_prints_a_json_object_even_for_an_unexpected_error(cli, tiny_model, tiny_npz, tmp_path,
                                                                       monkeypatch):
    r = cli("build", "--model", f"{tiny_model}:build", "--calib", tmp_path / "missing.npz", "--json")
    assert r.exit_code == 1
    err = json.loads(r.stdout)
    assert err["ok"] is False and err["error"] == "CalibrationError" and "does not exist" in err["what"]

    from edgeexport import pipeline

    def broken(*_a, **_k):
        raise RuntimeError("a case no check foresaw")

    monkeypatch.setattr(pipeline, "build", broken)
    r = cli("build", "--model", f"{tiny_model}:build", "--calib", tiny_npz, "--json", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "Traceback" not in r.stderr + r.stdout
    assert "unexpected RuntimeError: a case no check foresaw" in r.stderr and "EDGEEXPORT_TRACEBACK=1" in r.stderr
    assert json.loads(r.stdout)["ok"] is False


def test_verify_and_bench_say_what_is_wrong_with_their_arguments(cli, tiny_bundle, tmp_path):
    r = cli("verify", tmp_path / "nowhere")
    assert r.exit_code == 1 and "does not exist" in r.stderr and "rebuild" not in r.stderr
    assert json.loads(cli("verify", tmp_path / "nowhere", "--json").stdout)["ok"] is False
    for args in (["--duration", "-1"], ["--threads", "0"], ["--runs", "0"], ["--batch", "0"]):
        r = cli("bench", tiny_bundle, *args)
        assert r.exit_code == 2 and "Invalid value" in r.stderr, args
    r = cli("bench", tiny_bundle, "--runtime", "onnxruntime", "--cold-runs", "0", "--runs", "5")
    assert r.exit_code == 1 and "do not apply to ort bundles" in r.stderr  # TensorRT's fallback, not ORT's


def test_compare_refuses_a_precision_no_target_has_before_any_work(cli, tiny_model, tiny_npz):
    r = cli("compare", "--model", f"{tiny_model}:build", "--calib", tiny_npz, "--precisions", "int4")
    assert r.exit_code == 2 and "no target has" in r.stderr and "timing round" not in r.stderr


def test_one_hot_labels_are_read_as_class_indices_and_recorded():
    from edgeexport.calibration.sources import check_labels
    from edgeexport.errors import CalibrationError

    y = np.array([3, 0, 2, 2])
    assert check_labels(np.eye(4, dtype=np.int64)[y], "x").tolist() == y.tolist()
    assert check_labels(np.eye(4, dtype=np.float32)[y], "x").tolist() == y.tolist()
    for bad in (np.array([0.5, 1.0]), np.array([[0.2, 0.8]]), np.array([-1, 2])):
        with pytest.raises(CalibrationError):
            check_labels(bad, "x")


def test_a_config_file_without_precision_builds_what_the_cli_builds():
    from edgeexport.config import make_config

    assert make_config({"model": "m.onnx"}).precision == "int8"


def test_sixteen_bit_images_are_scaled_not_saturated(tmp_path):
    from PIL import Image

    gray = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    pre = {"size": [32, 32], "color": "gray", "scale": 1 / 255, "mean": [0.0], "std": [1.0], "layout": "nchw"}
    sixteen = loader.preprocess_image(tmp_path / "g16.png", pre)
    eight = loader.preprocess_image(Image.fromarray(np.round(gray / 257).astype(np.uint8)), pre)
    assert np.abs(sixteen - eight).max() < 1e-6 and sixteen.min() < 0.05 and sixteen.max() > 0.95


# ---- the bundle -------------------------------------------------------------------------------------------------

def _paths(o, p=()):
    yield p
    if isinstance(o, dict) and len(p) < 3:
        for k, v in o.items():
            yield from _paths(v, p + (k,))
    elif isinstance(o, list) and o and len(p) < 3:
        yield from _paths(o[0], p + (0,))


def test_an_edited_manifest_is_a_clear_error_never_a_crash(cli, tiny_bundle, tmp_path):
    """Every field the loader reads, set to values of the wrong type: verify exits 0 or 1 with a message, never a
    traceback; the fields that describe the model (its inputs, outputs, files, golden pairs) are refused."""
    original = json.loads((tiny_bundle / "manifest.json").read_text())
    skip = {"notes", "benchmark", "created", "versions", "model_stats", "config", "quantization", "calibration",
            "validation", "source", "export", "precision_label"}
    essential = {"inputs", "outputs", "files", "model_file", "golden", "schema_version"}
    copy_dir = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy_dir)
    tried = 0
    for path in _paths(original):
        if not path or path[0] in skip or path[-1] in ("count", "produced_by"):
            continue
        for value in ("x", [], {}, None, -1):
            m = copy.deepcopy(original)
            node = m
            for key in path[:-1]:
                node = node[key]
            if node[path[-1]] == value:
                continue
            node[path[-1]] = value
            (copy_dir / "manifest.json").write_text(json.dumps(m))
            r = cli("verify", copy_dir)
            tried += 1
            assert r.exit_code in (0, 1) and "Traceback" not in r.stderr + r.stdout, (path, value, r.stderr)
            if r.exit_code == 1:
                assert "error:" in r.stderr and "unexpected" not in r.stderr, (path, value, r.stderr)
            elif path[0] in essential and path[-1] != "dtype":
                pytest.fail(f"verify passed with manifest {'.'.join(map(str, path))} = {value!r}")
    assert tried > 60
    m = copy.deepcopy(original)
    m["outputs"] = []
    (copy_dir / "manifest.json").write_text(json.dumps(m))
    r = cli("verify", copy_dir)
    assert r.exit_code == 1 and "'outputs' is empty" in r.stderr


def test_bundle_folders_follow_the_umask(tiny_model, tiny_npz, tmp_path):
    from tests.conftest import make_cfg, quiet_build

    old = os.umask(0o022)
    try:
        out = tmp_path / "b"
        quiet_build(make_cfg(model=f"{tiny_model}:build", calibration={"path": str(tiny_npz)}, out=str(out),
                             bench={"enabled": False}, archive="tar.gz"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's 0700: a service account can read it
    assert stat.S_IMODE((out / "manifest.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(Path(str(out) + ".tar.gz").stat().st_mode) == 0o644


# ---- the terminal ------------------------------------------------------------------------------------------------

def test_native_library_output_is_caught_unless_verbose(monkeypatch):
    from edgeexport.util import quiet

    with quiet() as log:
        os.write(2, b"E0000 cuInit: no CUDA-capable device\n")
    assert "cuInit" in log.getvalue()
    monkeypatch.setenv("EDGEEXPORT_VERBOSE", "1")
    with quiet() as log:
        pass
    assert log.getvalue() == ""


def test_a_long_silent_step_says_it_is_still_going():
    import time

    from edgeexport.util import heartbeat

    lines = []
    with heartbeat(lines.append, "loading the model", every_s=0.05):
        time.sleep(0.3)
    assert lines and all(line.startswith("    ... still loading the model (") for line in lines)
