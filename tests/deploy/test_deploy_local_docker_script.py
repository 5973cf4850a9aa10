"""deploy/local-docker.sh without touching the machine: it parses, prints its usage, and a step
that fails ends the script with one line naming that step. (The real set-up and tear-down run
in test_deploy_docker_engine.py, marker `docker`.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.deploy.docker_compose_engine import LOCAL_DOCKER

pytestmark = pytest.mark.integration  # starts real processes


def run_script(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The script as an unprivileged user (nobody when the tests run as root), with its run
    and cache directories pointed at a scratch path."""
    drop = (
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.getuid() == 0 else []
    )
    scratch = str(tmp_path / "local-docker")
    env = {**os.environ, "CROSSFED_DOCKER_RUN_DIR": scratch, "CROSSFED_DOCKER_CACHE": scratch}
    return subprocess.run(
        [*drop, "bash", str(LOCAL_DOCKER), *args],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip


def test_script_parses() -> None:
    result = subprocess.run(
        ["bash", "-n", str(LOCAL_DOCKER)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_unknown_command_prints_usage(tmp_path: Path) -> None:
    result = run_script("frobnicate", tmp_path=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: deploy/local-docker.sh up|build")


def test_a_failing_step_is_one_line_naming_it(tmp_path: Path) -> None:
    for command in ("up", "build", "down"):
        result = run_script(command, tmp_path=tmp_path)
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        assert result.returncode == 1, (command, lines)
        assert lines[-1].startswith("local-docker: FAILED: check: must run as root"), lines
        assert "Traceback" not in result.stderr and "line " not in lines[-1]
