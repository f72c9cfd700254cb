"""Bad input: each case gets a clear error, exit code 1, no traceback, and nothing written at --out."""

import errno
import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow

CUSTOM_OP = '''
import torch

@torch.library.custom_op("edgetest::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2

@mystery.register_fake
def _(x):
    return torch.empty_like(x)

class M(torch.nn.Module):
    def forward(self, x):
        return mystery(x) + 1

def build():
    return M(), (torch.zeros(1, 6),)
'''


@pytest.fixture(scope="module")
def cases(tmp_path_factory, tiny_model, tiny_npz):
    d = tmp_path_factory.mktemp("bad")
    (d / "custom_op.py").write_text(CUSTOM_OP)
    np.savez(d / "names.npz", wrong=np.zeros((20, 6), np.float32))
    np.savez(d / "shape.npz", x=np.zeros((20, 5), np.float32))
    nan = np.zeros((20, 6), np.float32)
    nan[7, 2] = np.nan
    np.savez(d / "nan.npz", x=nan)
    (d / "empty").mkdir()
    (d / "garbage.onnx").write_bytes(b"\x00not an onnx model")
    t = str(tiny_model)
    good = str(tiny_npz)
    return {
        "spec does not resolve": (["--model", "no_such_pkg.models:build", "--calib", good], "cannot import module"),
        "file not found": (["--model", str(d / "missing.py") + ":build", "--calib", good], "not found"),
        "factory name missing": (["--model", t + ":nope", "--calib", good], "has no callable 'nope'"),
        "factory raises": (["--model", t + ":raises", "--calib", good], "raised RuntimeError"),
        "factory returns junk": (["--model", t + ":not_a_module", "--calib", good], "not a torch.nn.Module"),
        "forward raises": (["--model", t + ":bad_forward", "--calib", good], "forward raised ValueError"),
        "unconvertible op": (["--model", str(d / "custom_op.py") + ":build", "--calib", good],
                             "no ONNX translation for operator edgetest.mystery.default (graph node %mystery)"),
        "garbage onnx": (["--model", str(d / "garbage.onnx"), "--calib", good], "is not a valid ONNX model"),
        "calib names": (["--model", t + ":build", "--calib", str(d / "names.npz")], "do not match the model inputs"),
        "calib shape": (["--model", t + ":build", "--calib", str(d / "shape.npz")], "dimension 1 is 5"),
        "calib NaN": (["--model", t + ":build", "--calib", str(d / "nan.npz")], "NaN or Inf in 1 sample(s), first at index 7"),
        "empty image folder": (["--model", t + ":build", "--calib", str(d / "empty")], "4-D image input"),
        "too few samples": (["--model", t + ":build", "--calib", good, "--calib-samples", "500"],
                            "asked for 500 calibration samples but only 48"),
        "no calibration": (["--model", t + ":build"], "no calibration data given"),
        "unsupported precision option": (["--model", t + ":build", "--calib", good, "--option", "activation_type=int4"],
                                         "activation_type must be uint8 or int8"),
    }


CASES = ["spec does not resolve", "file not found", "factory name missing", "factory raises", "factory returns junk",
         "forward raises", "unconvertible op", "garbage onnx", "calib names", "calib shape", "calib NaN",
         "empty image folder", "too few samples", "no calibration", "unsupported precision option"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_a_clear_error(cli, cases, tmp_path, name):
    args, message = cases[name]
    out = tmp_path / "out"
    r = cli("build", *args, "--precision", "int8", "--out", out, "--no-bench")
    expected_code = 2 if name == "unsupported precision option" else 1
    assert r.exit_code == expected_code, (r.exit_code, r.stderr)
    assert message in r.stderr, r.stderr
    assert "error:" in r.stderr and "Traceback" not in r.stderr
    assert "fix:" in r.stderr or name in ("garbage onnx",)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_disk_failure_midway_leaves_no_bundle_and_keeps_the_old_one(cli, tiny_model, tiny_npz, tmp_path, monkeypatch):
    out = tmp_path / "b"
    base = ("build", "--model", f"{tiny_model}:build", "--calib", tiny_npz, "--precision", "fp32", "--out", out,
            "--no-bench")
    assert cli(*base).exit_code == 0
    before = (out / "manifest.json").read_text()
    import edgeexport.bundle.writer as writer

    calls = {"n": 0}
    real_savez = np.savez

    def failing_savez(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second golden file: model and loader are already copied
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_savez(*a, **kw)

    monkeypatch.setattr(writer.np, "savez", failing_savez)
    r = cli(*base, "--force")
    assert r.exit_code == 1 and "No space left on device" in r.stderr and "Traceback" not in r.stderr
    assert (out / "manifest.json").read_text() == before  # the previous complete bundle is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no partial or temporary folders left
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(writer.np, "savez", failing_savez)
    calls["n"] = 0
    r = cli(*base[:-3], "--out", fresh, "--no-bench")
    assert r.exit_code == 1 and not fresh.exists()


def test_synthetic_data_is_loud(cli, tiny_model, tmp_path):
    out = tmp_path / "b"
    r = cli("build", "--model", f"{tiny_model}:build", "--calib", "synthetic:40", "--precision", "int8", "--out", out,
            "--no-bench")
    assert r.exit_code == 0, r.stderr
    assert "SYNTHETIC" in r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["calibration"]["synthetic"] is True and any("SYNTHETIC" in n for n in m["notes"])
    assert "SYNTHETIC" in (out / "report.md").read_text()


MASKED_ATTENTION = '''
import torch, torch.nn as nn

class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(8, 8)
        self.register_buffer("mask", torch.triu(torch.full((8, 8), float("-inf")), diagonal=1))

    def forward(self, rows):
        scores = self.q(rows) @ rows.transpose(1, 2) + self.mask
        return torch.softmax(scores, -1) @ rows

def build():
    return {"model": Masked(), "inputs": ["rows:batchx8x8:float32"]}
'''


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_minus_inf_attention_mask_falls_back_with_a_message(cli, rows_npz, tmp_path, method):
    """Histogram calibrators fail on -inf masks: the build says so, keeps those nodes float and still validates."""
    (tmp_path / "masked.py").write_text(MASKED_ATTENTION)
    out = tmp_path / "b"
    r = cli("build", "--model", f"{tmp_path / 'masked.py'}:build", "--calib", rows_npz, "--precision", "int8",
            "--calib-method", method, "--out", out, "--no-bench")
    assert r.exit_code == 0, r.stderr
    assert f"{method} calibration failed" in r.stderr and "used minmax instead" in r.stderr
    assert "kept 2 node(s) in float" in r.stderr
    m = json.loads((out / "manifest.json").read_text())
    q = m["quantization"]
    assert q["calibration_method_requested"] == method and q["calibration_method"] == "minmax"
    assert len(q["exclude_nodes"]) == 2 and any("used minmax" in n for n in m["notes"])


def test_entropy_and_percentile_calibration_on_real_digits(digits_npz, tmp_path):
    from tests.conftest import make_cfg, quiet_build

    for method in ("entropy", "percentile"):
        result = quiet_build(make_cfg(model="edgeexport.models.digits:model", precision="int8",
                                      out=str(tmp_path / method), bench={"enabled": False},
                                      calibration={"path": str(digits_npz), "method": method}))
        assert result.manifest["quantization"]["calibration_method"] == method and not result.manifest["notes"][1:]
        assert result.report.task["drop_points"] <= 1.0
