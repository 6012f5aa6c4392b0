"""One version source: pyproject.toml's, read back through the installed metadata."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import wsitile

ROOT = Path(__file__).resolve().parents[1]


def test_version_comes_from_pyproject():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert wsitile.__version__ == declared
    result = subprocess.run([sys.executable, "-m", "wsitile", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"wsitile {declared}"
