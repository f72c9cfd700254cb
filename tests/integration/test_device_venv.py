"""The loader on a 'device': a fresh venv with only numpy + onnxruntime (+ tokenizers for text models), and no
torch, transformers or edgeexport."""

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
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"), "numpy", "onnxruntime", "tokenizers"],
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


def test_text_bundle_runs_without_torch_or_transformers(device_python, tmp_path):
    from edgeexport.models.sentences import minilm_path, write_sentences
    from tests.conftest import make_cfg, quiet_build

    calib = write_sentences(tmp_path / "calib.txt", 120)
    val = write_sentences(tmp_path / "val.txt", 40, skip=120)
    out = tmp_path / "bundle"
    result = quiet_build(make_cfg(model=f"hf:{minilm_path()}", precision="int8-dynamic", out=str(out),
                                  calibration={"path": str(calib), "validation_path": str(val)},
                                  bench={"enabled": False}))
    assert result.report.outputs["sentence_embedding"]["cosine"] >= 0.99
    device_dir = tmp_path / "on-device"
    shutil.copytree(out, device_dir)
    code = (
        "import sys, json, numpy as np; from loader import load; m = load('.'); "
        "e = m(['Bundles travel alone.', 'They carry a tokenizer.'])['sentence_embedding']; "
        "ok = m.selftest(verbose=False); "
        "mods = [k for k in ('torch', 'transformers', 'optimum', 'edgeexport') if k in sys.modules]; "
        "print(json.dumps({'shape': list(e.shape), 'norms': np.linalg.norm(e, axis=1).tolist(), 'ok': ok, 'heavy': mods}))"
    )
    run = subprocess.run([str(device_python), "-c", code], cwd=device_dir, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    res = json.loads(run.stdout)
    assert res["shape"] == [2, 384] and res["ok"] and res["heavy"] == []
    assert all(abs(n - 1) < 0.05 for n in res["norms"])  # normalized sentence embeddings
    probe = subprocess.run([str(device_python), "-c", "import transformers"], capture_output=True, text=True)
    assert probe.returncode != 0


@pytest.fixture(scope="module")
def litert_python(tmp_path_factory):
    env_dir = tmp_path_factory.mktemp("litert-device") / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"), "numpy", "ai-edge-litert"],
                   check=True, capture_output=True, text=True)
    return py


@pytest.mark.tflite
def test_tflite_bundle_runs_with_numpy_and_litert_only(litert_python, digits_npz, tmp_path):
    pytest.importorskip("onnx2tf", reason="needs the [tflite] extra")
    from tests.conftest import make_cfg, quiet_build

    out = tmp_path / "bundle"
    quiet_build(make_cfg(target="tflite", precision="int8", model="edgeexport.models.digits:model", out=str(out),
                         calibration={"path": str(digits_npz)}, bench={"enabled": False}))
    device_dir = tmp_path / "on-device"
    shutil.copytree(out, device_dir)
    st = subprocess.run([str(litert_python), "loader.py", "--selftest"], cwd=device_dir, capture_output=True, text=True)
    assert st.returncode == 0, st.stdout + st.stderr
    code = ("import sys, json, numpy as np; from loader import load; m = load('.'); "
            "y = m(np.zeros((1, 1, 8, 8), np.float32))['output']; "
            "mods = [k for k in ('torch', 'tensorflow', 'onnxruntime', 'edgeexport') if k in sys.modules]; "
            "print(json.dumps({'shape': list(y.shape), 'runtime': m._backend.runtime, 'heavy': mods}))")
    run = subprocess.run([str(litert_python), "-c", code], cwd=device_dir, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res == {"shape": [1, 10], "runtime": "ai-edge-litert", "heavy": []}
    probe = subprocess.run([str(litert_python), "-c", "import tensorflow"], capture_output=True, text=True)
    assert probe.returncode != 0
