"""`edgeexport sweep`: the same jobs on the local executor and on a real Ray cluster (a head and a second worker
that advertises a fake device resource, both on 127.0.0.1), resumable, with failures as rows."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edgeexport.bundle import loader

pytestmark = pytest.mark.slow

SWEEP = """
models:
  - name: digits
    model: edgeexport.models.digits:model
    calib: {data}
{extra}
targets: [ort, tflite]
precisions: [fp32, int8]
bench: {{runs: 10, warmup: 2, threads: 1}}
{bench_on}
"""
BROKEN = """  - name: strict
    model: edgeexport.models.digits:model
    calib: {data}
    options: {{tolerance: {{snr_db: 60}}}}
  - name: missing
    model: no_such_pkg.models:build
    calib: {data}"""


def _write(tmp_path, digits_npz, extra="", bench_on=""):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP.format(data=digits_npz, extra=extra.format(data=digits_npz), bench_on=bench_on))
    return path


def _metrics(report):
    return {j["job"]: (j["status"].removeprefix("cached-"), json.dumps(j["metrics"], sort_keys=True))
            for j in report["jobs"]}


@pytest.fixture(scope="module")
def local_report(digits_npz, tmp_path_factory):
    from click.testing import CliRunner

    from edgeexport.cli import main

    tmp = tmp_path_factory.mktemp("local")
    path = _write(tmp, digits_npz, BROKEN)
    r = CliRunner().invoke(main, ["sweep", str(path), "--out", str(tmp / "out"), "--workers", "2"],
                           catch_exceptions=False)
    return r, tmp, path


def test_local_sweep_builds_every_combination_and_keeps_going_past_failures(local_report):
    r, tmp, _ = local_report
    assert r.exit_code == 1  # a FAILED and two ERROR rows
    report = json.loads((tmp / "out" / "sweep.json").read_text())
    status = {j["job"]: j["status"] for j in report["jobs"]}
    assert [status[f"digits/{t}/{p}"] for t in ("ort", "tflite") for p in ("fp32", "int8")] == ["passed"] * 4
    assert status["strict/ort/int8"] == "failed" and status["missing/ort/fp32"] == "error"
    assert "snr_db" in next(j["reason"] for j in report["jobs"] if j["job"] == "strict/ort/int8")
    for j in report["jobs"]:
        if j["status"] == "passed":  # each a whole, verified bundle, benched through its own loader
            folder = next((tmp / "out" / "jobs").glob(f"{j['job'].replace('/', '-')}-{j['key']}"))
            loader.verify(folder / "bundle")
            assert j["bench"]["latency"]["runs"] == 10 and j["bench"]["protocol"]["threads"] == 1
    page = (tmp / "out" / "sweep.html").read_text()  # per model: every combination, its metrics by kind, a plot
    assert page.count("<h2>") == 3 and "output (logits): cosine" in page and "data:image/png;base64," in page
    assert "digits/tflite/int8" in (tmp / "out" / "sweep.md").read_text()


def test_a_rerun_builds_nothing_that_is_done_and_a_damaged_bundle_is_built_again(local_report):
    from click.testing import CliRunner

    from edgeexport.cli import main

    r, tmp, path = local_report
    report = json.loads((tmp / "out" / "sweep.json").read_text())
    victim = next(j for j in report["jobs"] if j["job"] == "digits/ort/int8")
    folder = next((tmp / "out" / "jobs").glob(f"digits-ort-int8-{victim['key']}"))
    (folder / "bundle" / "model.onnx").write_bytes(b"damaged")
    again = CliRunner().invoke(main, ["sweep", str(path), "--out", str(tmp / "out"), "--json"], catch_exceptions=False)
    rerun = json.loads(again.stdout)
    assert rerun["built"] == 5  # the damaged bundle and the four jobs that broke; FAILED is a result, kept
    assert {j["job"]: j["status"] for j in rerun["jobs"]}["digits/ort/fp32"] == "cached-passed"
    assert _metrics(rerun) == _metrics(report)
    loader.verify(folder / "bundle")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray", reason="needs the [ray] extra")
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    start = [ray_bin, "start", "--disable-usage-stats"]
    subprocess.run([*start, "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=false"], check=True, env=env, capture_output=True, timeout=120)
    try:  # the second node: a "device" that builds nothing (no CPU slots) and benches
        subprocess.run([*start, f"--address={address}", "--num-cpus=0", '--resources={"fake_device": 1}'],
                       check=True, env=env, capture_output=True, timeout=120)
        yield address
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_sweep_benches_on_the_device_node_and_equals_the_local_one(ray_cluster, local_report, digits_npz,
                                                                      tmp_path):
    import ray

    from click.testing import CliRunner

    from edgeexport.cli import main

    path = _write(tmp_path, digits_npz, bench_on="bench_on: fake_device")
    args = ["sweep", str(path), "--executor", "ray", "--address", ray_cluster, "--out", str(tmp_path / "out"),
            "--json"]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    ray.init(address=ray_cluster, logging_level="ERROR", log_to_driver=False)
    try:
        device = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("fake_device")}
    finally:
        ray.shutdown()
    assert len(device) == 1
    for j in report["jobs"]:
        assert j["ran_on"]["bench"] in device  # every bench on the node with the device resource
        assert j["ran_on"]["build"] not in device  # builds need a CPU slot, which the device node does not offer
    _, local_tmp, _ = local_report
    local = _metrics(json.loads((local_tmp / "out" / "sweep.json").read_text()))
    assert {k: v for k, v in local.items() if k.startswith("digits/")} == _metrics(report)
    again = CliRunner().invoke(main, args, catch_exceptions=False)
    assert json.loads(again.stdout)["built"] == 0


def test_bad_sweep_files_are_clear_errors(cli, tmp_path, digits_npz):
    (tmp_path / "a.yaml").write_text("models: []\ntargets: [ort]\nprecisions: [fp32]\n")
    r = cli("sweep", tmp_path / "a.yaml")
    assert r.exit_code == 2 and "'models' must be a non-empty list" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "b.yaml").write_text(f"models: [{{model: x.py:m, calib: {digits_npz}}}]\ntargets: [ort]\n"
                                     "precisions: [int3]\n")
    r = cli("sweep", tmp_path / "b.yaml")
    assert r.exit_code == 2 and "precision 'int3' is not one of" in r.stderr
    r = cli("sweep", tmp_path / "b.yaml", "--executor", "local", "--address", "1.2.3.4:1")
    assert r.exit_code == 2
