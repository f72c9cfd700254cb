"""The loader on a 'device': a fresh venv with only numpy + onnxruntime (no torch, no edgeexport)."""

import json
import shutil
import subprocess
import venv

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def device_python(tmp_path_factory):
    env_dir = tmp_path_factory.mktemp("device") / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"), "numpy", "onnxruntime"],
                   check=True, capture_output=True, text=True)
    return py


def test_bundle_runs_without_torch(device_python, cli, digits_npz, tmp_path):
    out = tmp_path / "bundle"
    r = cli("build", "--model", "edgeexport.models.digits:model", "--calib", digits_npz, "--precision", "int8",
            "--out", out, "--bench-runs", "3")
    assert r.exit_code == 0, r.stderr
    device_dir = tmp_path / "on-device"
    shutil.copytree(out, device_dir)  # the bundle travels alone
    probe = subprocess.run([str(device_python), "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0, "the device venv must not have torch"
    st = subprocess.run([str(device_python), "loader.py", "--selftest"], cwd=device_dir, capture_output=True, text=True)
    assert st.returncode == 0, st.stdout + st.stderr
    assert "selftest passed" in st.stdout
    code = (
        "import sys, json, numpy as np; from loader import load; m = load('.', threads=1); "
        "x = np.zeros((1, 1, 8, 8), np.float32); out = m({'image': x}); "
        "mods = [k for k in ('torch', 'onnx', 'edgeexport', 'onnxscript') if k in sys.modules]; "
        "print(json.dumps({'shape': list(out['output'].shape), 'heavy': mods}))"
    )
    run = subprocess.run([str(device_python), "-c", code], cwd=device_dir, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["shape"] == [1, 10] and result["heavy"] == []
    reqs = (device_dir / "requirements.txt").read_text().split()
    assert reqs[0] == "numpy" and reqs[1].startswith("onnxruntime>=") and len(reqs) == 2
