"""The CLI's fast paths: --help imports no heavy library; usage errors exit 2 without a traceback."""

import json
import subprocess
import sys


def test_help_imports_no_heavy_library():
    code = ("import sys; from click.testing import CliRunner; from edgeexport.cli import main; "
            "r = CliRunner().invoke(main, ['build', '--help']); assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('torch', 'onnxruntime', 'onnx', 'tensorflow', 'tensorrt') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_usage_errors_exit_2(cli):
    r = cli("build", "--model", "x.onnx", "--calib", "d.npz", "--input", "x:1xQ!:float32")
    assert r.exit_code == 2 and "cannot parse --input" in r.stderr or "invalid --input" in r.stderr
    r = cli("build", "--target", "coreml", "--model", "x.onnx")
    assert r.exit_code == 2 and "unknown target 'coreml'" in r.stderr
    r = cli("build", "--calib", "d.npz")
    assert r.exit_code == 2 and "no model given" in r.stderr
    r = cli("build", "--model", "x.onnx", "--option", "bogus=1", "--json")
    assert r.exit_code == 2 and json.loads(r.stdout)["ok"] is False


def test_malformed_config_file(cli, tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: [unclosed")
    r = cli("build", "-c", p)
    assert r.exit_code == 2 and "not valid YAML" in r.stderr and "Traceback" not in r.stderr
    p.write_text("model: m.onnx\nprecision: int3\n")
    r = cli("build", "-c", p)
    assert r.exit_code == 2 and "precision" in r.stderr
