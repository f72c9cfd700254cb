"""End to end through the CLI on real data: the digits CNN at every precision, the gate, replay, force."""

import json

import numpy as np
import pytest
import yaml

from edgeexport.bundle import loader

MODEL = "edgeexport.models.digits:model"
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8-dynamic", "int8"])
def test_every_precision_validates_and_self_tests(cli, digits_npz, tmp_path, precision):
    out = tmp_path / precision
    r = cli("build", "--model", MODEL, "--calib", digits_npz, "--precision", precision, "--out", out,
            "--bench-runs", "5", "--json")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["ok"] and summary["validation"]["passed"] and summary["precision"] == precision
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == precision and manifest["calibration"]["synthetic"] is False
    assert manifest["benchmark"]["built"]["median_ms"] > 0
    model = loader.load(out)
    assert model.selftest(verbose=False)
    # what the manifest reports is what the bundle does on held-out data
    assert manifest["validation"]["task"]["accuracy"] >= 0.9


def test_int8_keeps_test_accuracy_within_one_point(digits_npz, tmp_path):
    """Acceptance: int8 digits accuracy within 1 point of PyTorch on every held-out image (284 of 540)."""
    from edgeexport.calibration import load_calibration
    from edgeexport.config import CalibrationConfig, InputSpec
    from edgeexport.models.digits import train
    from tests.conftest import make_cfg, quiet_build

    result = quiet_build(make_cfg(model=MODEL, precision="int8", out=str(tmp_path / "b"),
                                  calibration={"path": str(digits_npz), "samples": 256, "holdout": 284}))
    task = result.report.task
    assert task["samples"] == 284 and task["drop_points"] <= 1.0
    # independently: run the bundle with the device loader on the holdout and compare with torch eager
    import torch

    cs = load_calibration(CalibrationConfig(path=str(digits_npz), samples=256, holdout=284),
                          [InputSpec(name="image", shape=[1, 1, 8, 8])])
    model, net = loader.load(tmp_path / "b"), train()
    x = np.concatenate([f["image"] for f in cs.holdout()])
    y = cs.holdout_labels()
    int8_pred = np.array([model(x[i : i + 1])["output"].argmax() for i in range(len(x))])
    with torch.no_grad():
        ref_pred = net(torch.from_numpy(x)).argmax(1).numpy()
    assert abs((int8_pred == y).mean() - (ref_pred == y).mean()) <= 0.01
    assert (ref_pred == y).mean() > 0.95


def test_gate_failure_exits_1_and_writes_nothing(cli, digits_npz, tmp_path):
    out = tmp_path / "never"
    r = cli("build", "--model", MODEL, "--calib", digits_npz, "--precision", "int8", "--out", out,
            "--tolerance", "snr_db=90", "--json")
    assert r.exit_code == 1
    assert "validation failed" in r.stderr and "snr_db" in r.stderr and "Traceback" not in r.stderr
    assert "[FAIL] output: snr_db" in r.stderr  # the whole table is printed before deciding
    body = json.loads(r.stdout)
    assert body["ok"] is False and body["validation"]["passed"] is False
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_dry_run_and_replay(cli, digits_npz, tmp_path):
    out = tmp_path / "replayed"
    r = cli("build", "--model", MODEL, "--calib", digits_npz, "--precision", "int8", "--calib-method", "percentile",
            "--out", out, "--dry-run")
    assert r.exit_code == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["inputs"] == [{"name": "image", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert cfg["calibration"]["method"] == "percentile" and not out.exists()
    path = tmp_path / "c.yaml"
    path.write_text(r.stdout)
    r = cli("build", "-c", path, "--no-bench")
    assert r.exit_code == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["quantization"]["calibration_method"] == "percentile" and m["benchmark"] is None
    assert m["config"]["calibration"]["method"] == "percentile"


def test_existing_output_needs_force_and_force_only_replaces_bundles(cli, digits_npz, tmp_path):
    out = tmp_path / "b"
    args = ("build", "--model", MODEL, "--calib", digits_npz, "--precision", "fp32", "--out", out, "--no-bench")
    assert cli(*args).exit_code == 0
    first = (out / "manifest.json").read_text()
    r = cli(*args)
    assert r.exit_code == 1 and "already exists" in r.stderr and "--force" in r.stderr
    assert (out / "manifest.json").read_text() == first
    assert cli(*args, "--force").exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["created"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    r = cli("build", "--model", MODEL, "--calib", digits_npz, "--out", precious, "--force")
    assert r.exit_code == 1 and "not an edgeexport bundle" in r.stderr
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_verify_and_inspect(cli, digits_npz, tmp_path):
    out = tmp_path / "b"
    assert cli("build", "--model", MODEL, "--calib", digits_npz, "--precision", "int8", "--out", out,
               "--bench-runs", "3").exit_code == 0
    r = cli("verify", out)
    assert r.exit_code == 0 and "golden self-test passed" in r.stdout
    r = cli("inspect", out)
    assert r.exit_code == 0 and "int8 static" in r.stdout and "image: [1, 1, 8, 8] float32" in r.stdout
    (out / "model.onnx").write_bytes(b"garbage")
    r = cli("verify", out)
    assert r.exit_code == 1 and "checksum mismatch for model.onnx" in r.stderr


def test_dynamic_batch_transformer(cli, rows_npz, tmp_path):
    """Second architecture (attention, LayerNorm, GELU) with a named dynamic batch dimension."""
    out = tmp_path / "rows"
    r = cli("build", "--model", "edgeexport.models.digit_rows:model", "--calib", rows_npz, "--precision", "int8",
            "--out", out, "--bench-runs", "3")
    assert r.exit_code == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["inputs"][0]["shape"] == ["batch", 8, 8]
    assert m["outputs"][0]["shape"][0] == "batch"
    model = loader.load(out)
    x = np.load(rows_npz)["rows"][:5]
    batched = model(x)["output"]
    assert batched.shape == (5, 10)
    single = np.concatenate([model(x[i : i + 1])["output"] for i in range(5)])
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-4)


def test_labels_from_a_separate_file(cli, digits_npz, tmp_path):
    data = np.load(digits_npz)
    images = tmp_path / "images.npy"
    np.save(images, data["image"])
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(str(v) for v in data["labels"]))
    out = tmp_path / "b"
    r = cli("build", "--model", MODEL, "--calib", images, "--labels", labels, "--precision", "fp32", "--out", out,
            "--no-bench", "--json")
    assert r.exit_code == 0, r.stderr
    task = json.loads(r.stdout)["validation"]["task"]
    assert task["reference_accuracy"] > 0.95 and task["drop_points"] == pytest.approx(0.0, abs=1e-9)
    labels.write_text("1\n2\n")
    r = cli("build", "--model", MODEL, "--calib", images, "--labels", labels, "--out", tmp_path / "c")
    assert r.exit_code == 1 and "2 labels for 540 samples" in r.stderr


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_archive_is_written_opened_and_never_overwritten_unasked(cli, digits_npz, tmp_path, fmt):
    out = tmp_path / "b"
    args = ["build", "--model", MODEL, "--calib", digits_npz, "--precision", "int8", "--no-bench", "--out", out]
    r = cli(*args, "--archive", fmt)
    assert r.exit_code == 0, r.stderr
    packed = tmp_path / f"b.{fmt}"
    assert packed.is_file() and sorted(p.name for p in tmp_path.iterdir()) == sorted(["b", packed.name])
    assert loader.load(packed).selftest(verbose=False)
    r = cli("verify", packed)
    assert r.exit_code == 0 and "checksums match" in r.stdout
    import shutil

    shutil.rmtree(out)  # the folder is gone, the archive is still there: a new build must not replace it unasked
    r = cli(*args, "--archive", fmt)
    assert r.exit_code == 1 and "already exists" in r.stderr and "--force" in r.stderr and not out.exists()
