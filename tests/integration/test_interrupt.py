"""A build killed at any stage (SIGINT or SIGKILL) leaves the previous bundle whole at the output path, or the new
one whole, never a mix; whatever a killed build left behind is cleaned up by the next one."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgeexport.bundle import loader

MODEL = "edgeexport.models.digits:model"
STAGES = ["==> loading model", "==> exporting ONNX", "==> building", "==> validating", "==> writing bundle"]
pytestmark = pytest.mark.slow


def _ours(tmp: Path) -> list[str]:
    """edgeexport's work folders in TMPDIR (torch keeps caches of its own there)."""
    return [p.name for p in tmp.iterdir() if p.name.startswith("edgeexport-")]


def _build(args, env, cwd):
    return subprocess.Popen([sys.executable, "-m", "edgeexport", "build", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


def _kill_at(proc, marker, sig):
    """Read the build's progress lines; send ``sig`` as soon as ``marker`` is printed. True if it was sent."""
    for line in proc.stderr:
        if line.startswith(marker):
            proc.send_signal(sig)
            proc.communicate(timeout=120)
            return True
    proc.wait(timeout=120)
    return False


@pytest.fixture(scope="module")
def previous(digits_npz, tmp_path_factory):
    """A complete fp32 bundle, copied fresh for each case."""
    out = tmp_path_factory.mktemp("prev") / "bundle"
    r = subprocess.run([sys.executable, "-m", "edgeexport", "build", "--model", MODEL, "--calib", str(digits_npz),
                        "--precision", "fp32", "--no-bench", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-800:]
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("stage", STAGES)
def test_killed_build_leaves_a_whole_bundle_or_the_old_one(previous, digits_npz, tmp_path, stage, sig):
    import shutil

    out = tmp_path / "bundle"
    shutil.copytree(previous, out)
    env = dict(os.environ, EDGEEXPORT_NO_PROGRESS="1", TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    args = ["--model", MODEL, "--calib", str(digits_npz), "--precision", "int8", "--no-bench", "--force",
            "--out", str(out)]
    proc = _build(args, env, tmp_path)
    sent = _kill_at(proc, stage, sig)
    assert sent, f"the build never printed {stage!r}"
    if sig == signal.SIGINT:
        assert proc.returncode == 130
    # the output path holds a complete bundle: the previous one, or (if the kill came after the swap) the new one
    model = loader.load(out)
    assert model.selftest(verbose=False)
    precision = json.loads((out / "manifest.json").read_text())["precision"]
    assert precision in ("fp32", "int8")
    if stage != "==> writing bundle":
        assert precision == "fp32"  # killed before anything was written: the old bundle is untouched
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle.")]
    if sig == signal.SIGINT:  # an interrupted build cleans up after itself
        assert leftovers == [] and _ours(tmp_path / "tmp") == []
    # the next build removes whatever a killed one could not, and completes
    again = subprocess.run([sys.executable, "-m", "edgeexport", "build", *args], capture_output=True, text=True,
                           env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-800:]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle.")] == []
    assert _ours(tmp_path / "tmp") == []
    assert json.loads((out / "manifest.json").read_text())["precision"] == "int8"


def test_stale_backup_of_a_bundle_is_put_back(tmp_path):
    """Killed between moving the old bundle aside and moving the new one in: the next build restores the old."""
    from edgeexport.util import remove_stale

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    backup = tmp_path / f".bundle.old-{dead.stdout.strip()}-abc"
    backup.mkdir()
    (backup / "manifest.json").write_text("{}")
    remove_stale(tmp_path, (".bundle.partial-", ".bundle.old-"), restore_to=tmp_path / "bundle")
    assert (tmp_path / "bundle" / "manifest.json").is_file() and not backup.exists()
