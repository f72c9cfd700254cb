"""The loader on a 'device': a fresh venv with only numpy + onnxruntime (+ tokenizers for text models), and no
torch, transformers or edgeexport."""

import json
import shutil
import subprocess
import venv

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _device_venv(tmp_path_factory, name, *packages):
    """A fresh venv holding only ``packages`` (pinned by constraints.txt): what a device would install."""
    env_dir = tmp_path_factory.mktemp(name) / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"), *packages],
                   check=True, capture_output=True, text=True)
    return py


def _to_device(out, tmp_path):
    """The bundle travels alone: a copy with nothing of the build around it."""
    device_dir = tmp_path / "on-device"
    shutil.copytree(out, device_dir)
    return device_dir


def _run_json(python, device_dir, code):
    """Run ``code`` with the device's python next to the bundle; it prints one JSON line last."""
    run = subprocess.run([str(python), "-c", code], cwd=device_dir, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def _digits_int8_on_device(target, python, digits_npz, tmp_path):
    """The digits CNN built to int8 for ``target``, copied alone to a 'device' folder, and self-tested there with
    the device venv's ``python``."""
    from tests.conftest import make_cfg, quiet_build

    out = tmp_path / "bundle"
    quiet_build(make_cfg(target=target, precision="int8", model="edgeexport.models.digits:model", out=str(out),
                         calibration={"path": str(digits_npz)}, bench={"enabled": False}))
    device_dir = _to_device(out, tmp_path)
    st = subprocess.run([str(python), "loader.py", "--selftest"], cwd=device_dir, capture_output=True, text=True)
    assert st.returncode == 0, st.stdout + st.stderr
    return device_dir


def _lacks(python, module):
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True).returncode != 0


@pytest.fixture(scope="module")
def device_python(tmp_path_factory):
    return _device_venv(tmp_path_factory, "device", "numpy", "onnxruntime", "tokenizers")


def test_bundle_runs_without_torch(device_python, cli, digits_npz, tmp_path):
    out = tmp_path / "bundle"
    r = cli("build", "--model", "edgeexport.models.digits:model", "--calib", digits_npz, "--precision", "int8",
            "--out", out, "--bench-runs", "3")
    assert r.exit_code == 0, r.stderr
    device_dir = _to_device(out, tmp_path)
    assert _lacks(device_python, "torch"), "the device venv must not have torch"
    st = subprocess.run([str(device_python), "loader.py", "--selftest"], cwd=device_dir, capture_output=True, text=True)
    assert st.returncode == 0, st.stdout + st.stderr
    assert "selftest passed" in st.stdout
    code = (
        "import sys, json, numpy as np; from loader import load; m = load('.', threads=1); "
        "x = np.zeros((1, 1, 8, 8), np.float32); out = m({'image': x}); "
        "mods = [k for k in ('torch', 'onnx', 'edgeexport', 'onnxscript') if k in sys.modules]; "
        "print(json.dumps({'shape': list(out['output'].shape), 'heavy': mods}))"
    )
    result = _run_json(device_python, device_dir, code)
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
                                  bench={"enabled": False}, target_options={"device": "host"}))  # it runs here
    assert result.report.outputs["sentence_embedding"]["cosine"] >= 0.99
    device_dir = _to_device(out, tmp_path)
    code = (
        "import sys, json, numpy as np; from loader import load; m = load('.'); "
        "e = m(['Bundles travel alone.', 'They carry a tokenizer.'])['sentence_embedding']; "
        "ok = m.selftest(verbose=False); "
        "mods = [k for k in ('torch', 'transformers', 'optimum', 'edgeexport') if k in sys.modules]; "
        "print(json.dumps({'shape': list(e.shape), 'norms': np.linalg.norm(e, axis=1).tolist(), 'ok': ok, 'heavy': mods}))"
    )
    res = _run_json(device_python, device_dir, code)
    assert res["shape"] == [2, 384] and res["ok"] and res["heavy"] == []
    assert all(abs(n - 1) < 0.05 for n in res["norms"])  # normalized sentence embeddings
    assert _lacks(device_python, "transformers")


@pytest.fixture(scope="module")
def litert_python(tmp_path_factory):
    return _device_venv(tmp_path_factory, "litert-device", "numpy", "ai-edge-litert")


@pytest.mark.tflite
def test_tflite_bundle_runs_with_numpy_and_litert_only(litert_python, digits_npz, tmp_path):
    pytest.importorskip("onnx2tf", reason="needs the [tflite] extra")
    device_dir = _digits_int8_on_device("tflite", litert_python, digits_npz, tmp_path)
    code = ("import sys, json, numpy as np; from loader import load; m = load('.'); "
            "y = m(np.zeros((1, 1, 8, 8), np.float32))['output']; "
            "mods = [k for k in ('torch', 'tensorflow', 'onnxruntime', 'edgeexport') if k in sys.modules]; "
            "print(json.dumps({'shape': list(y.shape), 'runtime': m._backend.runtime, 'heavy': mods}))")
    res = _run_json(litert_python, device_dir, code)
    assert res == {"shape": [1, 10], "runtime": "ai-edge-litert", "heavy": []}
    assert _lacks(litert_python, "tensorflow")


@pytest.fixture(scope="module")
def openvino_python(tmp_path_factory):
    return _device_venv(tmp_path_factory, "openvino-device", "numpy", "openvino")


def test_openvino_bundle_runs_with_numpy_and_openvino_only(openvino_python, digits_npz, tmp_path):
    pytest.importorskip("nncf", reason="needs the [openvino] extra")
    device_dir = _digits_int8_on_device("openvino", openvino_python, digits_npz, tmp_path)
    code = ("import sys, json, numpy as np; from loader import load; m = load('.', threads=1); "
            "y = m(np.zeros((1, 1, 8, 8), np.float32))['output']; "
            "p = str(m._backend.compiled.get_property('INFERENCE_PRECISION_HINT')); "
            "mods = [k for k in ('torch', 'onnxruntime', 'nncf', 'edgeexport') if k in sys.modules]; "
            "print(json.dumps({'shape': list(y.shape), 'runtime': m._backend.runtime, 'hint': p, 'heavy': mods}))")
    res = _run_json(openvino_python, device_dir, code)
    # the compute precision the build validated, not the CPU plugin's own choice (bf16 where the CPU has it)
    assert res == {"shape": [1, 10], "runtime": "openvino", "hint": "<Type: 'float32'>", "heavy": []}
    assert _lacks(openvino_python, "onnxruntime") and _lacks(openvino_python, "nncf")
    assert (device_dir / "requirements.txt").read_text().split() == ["numpy", f"openvino>={_ov_minor()}"]


def _ov_minor() -> str:
    import openvino

    return ".".join(openvino.__version__.split(".")[:2])


def test_a_decoder_bundle_generates_without_torch(device_python, tmp_path):
    """--task text-generation: the int4 decoder's loader generates with numpy + onnxruntime + tokenizers."""
    from edgeexport.models.decoder import decoder_path, held_out_text
    from tests.conftest import make_cfg, quiet_build

    held = tmp_path / "held.txt"
    held.write_text("\n".join(" ".join(t.split()) for t in held_out_text()) + "\n", encoding="utf-8")
    out = tmp_path / "bundle"
    quiet_build(make_cfg(model=f"hf:{decoder_path()}", task="text-generation", precision="int4-weight",
                         out=str(out), calibration={"path": str(held)}, bench={"enabled": False}))
    device_dir = _to_device(out, tmp_path)
    st = subprocess.run([str(device_python), "loader.py", "--selftest"], cwd=device_dir, capture_output=True, text=True)
    assert st.returncode == 0 and "golden continuation 0: 16 tokens ok" in st.stdout, st.stdout + st.stderr
    code = (
        "import sys, json; from loader import load; m = load('.', threads=1); "
        "t = m.generate('The import statement', max_new_tokens=16, stop=False); "
        "s = m.generate('The import statement', max_new_tokens=16, temperature=0.8, top_k=40, seed=1, stop=False); "
        "mods = [k for k in ('torch', 'transformers', 'onnx', 'edgeexport') if k in sys.modules]; "
        "print(json.dumps({'greedy': t, 'sampled': s, 'heavy': mods}))"
    )
    result = _run_json(device_python, device_dir, code)
    assert result["heavy"] == [] and result["greedy"].strip() and result["sampled"].strip()
    from edgeexport.bundle.loader import load

    assert load(out).generate("The import statement", max_new_tokens=16, stop=False) == result["greedy"]
