"""`crossfed --help` and `--version` work from the installed console script."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import crossfed

pytestmark = pytest.mark.integration  # starts real processes


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("crossfed")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "crossfed", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_version_prints_package_version() -> None:
    out = _run("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"crossfed {crossfed.__version__}"


def test_help_lists_usage() -> None:
    out = _run("--help")
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout and "crossfed" in out.stdout


def test_unknown_command_fails_with_nonzero_exit() -> None:
    out = _run("no-such-command")
    assert out.returncode != 0
