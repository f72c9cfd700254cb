"""Static checks that catch real bugs (undefined names, unused imports, risky patterns) across the tree."""

import shutil
import subprocess
import sys

from tests.conftest import REPO


def test_ruff_finds_no_errors():
    ruff = shutil.which("ruff", path=str(REPO / ".venv" / "bin")) or shutil.which("ruff")
    cmd = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    r = subprocess.run([*cmd, "check", "--select", "F,E9,B", "--ignore", "B008,B905", "--exclude", ".venv,build",
                        str(REPO)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
