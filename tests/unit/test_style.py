"""The tree stays ruff-formatted and lint-clean (ruff is pinned in the [dev] extra, so its output is stable)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "ruff", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed: pip install -e '.[dev]'")
def test_tree_is_formatted():
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, f"run `ruff format .`:\n{result.stdout[-2000:]}"


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed: pip install -e '.[dev]'")
def test_tree_is_lint_clean():
    result = ruff("check", ".")
    assert result.returncode == 0, f"run `ruff check .`:\n{result.stdout[-2000:]}"
