"""One loaded bundle called from 8 threads returns exactly what one thread returns, for every target that runs
here; two builds at once into different folders do not interfere."""

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edgeexport.bundle import loader
from tests.conftest import make_cfg, quiet_build

MODEL = "edgeexport.models.digits:model"
THREADS, CALLS = 8, 500  # 4,000 inferences per target
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("target,runtime", [("ort", None), ("tflite", None), ("trt", "onnxruntime")])
def test_eight_threads_match_one_thread_exactly(digits_npz, tmp_path, target, runtime):
    out = quiet_build(make_cfg(model=MODEL, target=target, precision="int8", out=str(tmp_path / target),
                               calibration={"path": str(digits_npz)}, bench={"enabled": False})).out
    model = loader.load(out, threads=1, runtime=runtime)
    images = np.load(digits_npz)["image"][:64]
    expected = [model({"image": images[i : i + 1]})["output"] for i in range(len(images))]
    mismatches, errors = [], []

    def worker(seed: int) -> None:
        order = np.random.default_rng(seed).integers(0, len(images), CALLS)
        try:
            for i in order:
                got = model({"image": images[i : i + 1]})["output"]
                if not np.array_equal(got, expected[i]):
                    mismatches.append((seed, int(i)))
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not mismatches, (errors[:3], mismatches[:5])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_builds_at_once_do_not_interfere(digits_npz, tmp_path):
    args = ["--model", MODEL, "--calib", str(digits_npz), "--no-bench"]
    env = dict(os.environ, EDGEEXPORT_NO_PROGRESS="1")
    exe = [sys.executable, "-m", "edgeexport"]
    procs = [subprocess.Popen([*exe, "build", *args, "--precision", p, "--out", str(tmp_path / f"par-{p}"), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for p in ("int8", "fp16")]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-800:] for r in results]
    for p in ("int8", "fp16"):  # each is exactly what a build on its own produces
        alone = subprocess.run([*exe, "build", *args, "--precision", p, "--out", str(tmp_path / f"alone-{p}")],
                               capture_output=True, text=True, env=env, cwd=tmp_path)
        assert alone.returncode == 0, alone.stderr[-800:]
        par, one = tmp_path / f"par-{p}", tmp_path / f"alone-{p}"
        assert _sha(par / "model.onnx") == _sha(one / "model.onnx")
        assert json.loads((par / "manifest.json").read_text())["precision"] == p
        assert loader.load(par).selftest(verbose=False)
    # nothing left behind: no partial folders, no stray temporaries in the working folder
    assert sorted(x.name for x in tmp_path.iterdir()) == ["alone-fp16", "alone-int8", "par-fp16", "par-int8"]
