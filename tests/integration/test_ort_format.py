"""ORT Mobile's format: --target ort --option format=ort ships model.ort and the operator list of a reduced build,
validated and self-tested like model.onnx."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_ort_format_bundles_validate_and_selftest(cli, digits_npz, tmp_path, precision):
    out = tmp_path / precision
    r = cli("build", "--model", "edgeexport.models.digits:model", "--calib", digits_npz, "--precision", precision,
            "--option", "format=ort", "--out", out, "--no-bench")
    assert r.exit_code == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["model_file"] == "model.ort" and not (out / "model.onnx").exists()
    assert m["quantization"]["format"] == "ort" and len(m["quantization"]["onnx_sha256"]) == 64
    assert m["validation"]["passed"]
    assert (out / "model.ort").read_bytes()[4:8] == b"ORTM"  # the flatbuffer's file identifier
    ops = (out / "required_operators.config").read_text()
    assert "ai.onnx" in ops and ("Conv" in ops or "QLinearConv" in ops or "QuantizeLinear" in ops)
    if precision == "int8":
        assert "QuantizeLinear" in ops and m["quantization"]["integer_share"]["integer_mac_share"] == 1.0
    assert "required_operators.config" in {f["path"] for f in m["files"]}  # checksummed like the model
    st = subprocess.run([sys.executable, str(out / "loader.py"), "--selftest"], capture_output=True, text=True)
    assert st.returncode == 0, st.stdout + st.stderr


@pytest.mark.parametrize("args, message", [
    (["--option", "format=flatbuffer"], "format must be onnx or ort"),
    (["--option", "format=ort", "--explain"], "--explain and --accuracy-budget read the Q/DQ ONNX graph"),
])
def test_ort_format_refuses_what_it_cannot_do(cli, digits_npz, tmp_path, args, message):
    r = cli("build", "--model", "edgeexport.models.digits:model", "--calib", digits_npz, "--precision", "int8",
            *args, "--out", tmp_path / "x", "--no-bench")
    assert r.exit_code == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()
