"""The bundle loader as a device runs it: verify before load, refuse tampering and escapes, check inputs."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgeexport.bundle import loader


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _edit_manifest(bundle, fn):
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def _rehash(bundle, rel):
    def fix(m):
        for f in m["files"]:
            if f["path"] == rel:
                data = (bundle / rel).read_bytes()
                f["sha256"], f["size"] = hashlib.sha256(data).hexdigest(), len(data)
    _edit_manifest(bundle, fix)


def test_load_run_and_selftest(bundle):
    model = loader.load(bundle)
    x = np.random.default_rng(0).standard_normal((1, 6)).astype(np.float32)
    out = model({"x": x})
    assert set(out) == {"output"} and out["output"].shape == (1, 4)
    np.testing.assert_array_equal(model(x)["output"], out["output"])  # single array for one-input models
    assert model.selftest(verbose=False)


def test_bundle_layout(bundle):
    m = json.loads((bundle / "manifest.json").read_text())
    names = {f["path"] for f in m["files"]}
    assert {"model.onnx", "loader.py", "requirements.txt", "report.md", "golden/000.npz"} <= names
    for key in ("versions", "inputs", "outputs", "quantization", "calibration", "validation", "benchmark", "config"):
        assert key in m
    assert {"torch", "onnx", "onnxruntime", "edgeexport"} <= set(m["versions"])
    assert m["inputs"] == [{"name": "x", "shape": [1, 6], "dtype": "float32"}]


@pytest.mark.parametrize("bad,match", [
    ({"x": np.zeros((1, 5), np.float32)}, "shape"),
    ({"x": np.zeros((1, 6), np.float64)}, "dtype float64"),
    ({"y": np.zeros((1, 6), np.float32)}, "input names"),
    ({"x": [[0.0] * 6]}, "numpy array"),
])
def test_inputs_are_checked(bundle, bad, match):
    with pytest.raises(loader.InputError, match=match):
        loader.load(bundle)(bad)


def test_tampered_model_is_refused(bundle):
    with open(bundle / "model.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(loader.BundleError, match="checksum mismatch for model.onnx"):
        loader.load(bundle)


def test_missing_file_and_fields(bundle):
    (bundle / "golden" / "000.npz").unlink()
    with pytest.raises(loader.BundleError, match="golden/000.npz is missing"):
        loader.load(bundle)
    _edit_manifest(bundle, lambda m: m.pop("files"))
    with pytest.raises(loader.BundleError, match="lacks required fields: files"):
        loader.load(bundle)


def test_unknown_schema_version(bundle):
    _edit_manifest(bundle, lambda m: m.update(schema_version=99))
    with pytest.raises(loader.BundleError, match="schema_version 99"):
        loader.load(bundle)


@pytest.mark.parametrize("path", ["../outside.onnx", "/etc/passwd", "golden/../../x", "a\\b", "C:evil"])
def test_paths_that_escape_are_refused(bundle, path):
    _edit_manifest(bundle, lambda m: m["files"].append({"path": path, "sha256": "0"}))
    with pytest.raises(loader.BundleError, match="unsafe path|escapes|leaves"):
        loader.load(bundle)


def test_symlinked_model_is_refused(bundle, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(bundle / "model.onnx", outside)
    os.symlink(outside, bundle / "model.onnx")
    with pytest.raises(loader.BundleError, match="link"):
        loader.load(bundle)


def test_garbage_manifest(bundle):
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(loader.BundleError, match="not valid JSON"):
        loader.load(bundle)
    (bundle / "manifest.json").write_text("[1, 2]")
    with pytest.raises(loader.BundleError, match="JSON object"):
        loader.load(bundle)


def test_selftest_cli_exit_codes(bundle):
    ok = subprocess.run([sys.executable, str(bundle / "loader.py"), "--selftest"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "selftest passed" in ok.stdout
    # golden outputs that no longer match (re-hashed so verification passes): selftest must fail with exit 1
    with np.load(bundle / "golden" / "000.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["output/output"] = arrays["output/output"] + 1.0
    with open(bundle / "golden" / "000.npz", "wb") as f:
        np.savez(f, **arrays)
    _rehash(bundle, "golden/000.npz")
    bad = subprocess.run([sys.executable, str(bundle / "loader.py"), "--selftest"], capture_output=True, text=True)
    assert bad.returncode == 1 and "MISMATCH" in bad.stdout
    # tampering: exit 2 with the reason, no traceback
    (bundle / "requirements.txt").write_text("torch\n")
    tampered = subprocess.run([sys.executable, str(bundle / "loader.py"), "--selftest"], capture_output=True, text=True)
    assert tampered.returncode == 2 and "checksum mismatch for requirements.txt" in tampered.stderr
    assert "Traceback" not in tampered.stderr


RUNTIMES = {"ort": set(), "tflite": {"ai_edge_litert", "tflite_runtime", "tensorflow"},
            "trt": {"tensorrt", "cuda"}, "openvino": {"openvino"}}


@pytest.mark.parametrize("target", sorted(RUNTIMES))
def test_assembled_loader_imports_only_numpy_stdlib_and_its_runtime(target):
    """Each target's shipped loader.py: the core plus that one backend; module-level imports are stdlib + numpy,
    and anything else imported anywhere is that target's runtime (imported lazily, inside the backend)."""
    import ast
    import sys

    from edgeexport.bundle.writer import assemble_loader
    from edgeexport.targets import REGISTRY, get_target

    src = assemble_loader(get_target(target).loader_backend())
    tree = ast.parse(src)
    top = {n.names[0].name.split(".")[0] for n in tree.body if isinstance(n, ast.Import)}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert top <= set(sys.stdlib_module_names) | {"numpy"}, top
    anywhere = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    anywhere |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    # preprocess() and encode(), for bundles that record images or a tokenizer; the core's OnnxSession (lazily)
    optional = {"PIL", "tokenizers", "onnxruntime"}
    assert anywhere - set(sys.stdlib_module_names) - {"numpy"} - optional <= RUNTIMES[target], anywhere
    assert "edgeexport" not in anywhere and "torch" not in anywhere
    assert "pickle" not in src.replace("never unpickles", "").replace("allow_pickle=False", "")
    others = [b for name in REGISTRY if name != target and (b := get_target(name).loader_backend())]
    for other in others:  # no other target's backend ships in this bundle
        assert f"backend from the {other.parent.name} target unit" not in src
    assert f'@backend("{target}")' in src
    # every line of the backend below its marker ships as a line of its own (none glued onto a comment)
    from edgeexport.bundle.writer import BACKEND_MARKER

    body = get_target(target).loader_backend().read_text().split(BACKEND_MARKER, 1)[1].split("\n", 1)[1]
    shipped = set(src.splitlines())
    assert [line for line in body.splitlines() if line not in shipped] == []


def test_preprocess_needs_recorded_preprocessing(bundle):
    with pytest.raises(loader.InputError, match="no image preprocessing"):
        loader.load(bundle).preprocess(np.zeros((8, 8, 3), np.uint8))


def test_preprocess_matches_the_manifest(bundle):
    pre = {"size": [4, 6], "resize_shorter": None, "color": "bgr", "scale": 1.0, "mean": [0.0], "std": [2.0],
           "layout": "nhwc"}
    img = np.zeros((4, 6, 3), np.uint8)
    img[..., 0] = 10  # red channel
    out = loader.preprocess_image(img, pre)
    assert out.shape == (4, 6, 3) and out[..., 2].max() == 5.0 and out[..., 0].max() == 0.0  # BGR, /std
