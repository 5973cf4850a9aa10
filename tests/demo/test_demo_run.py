"""`crossfed demo` end to end: a real server and client processes over TLS on loopback, a
report with a table and a plot, and no process left behind (normal end and Ctrl-C)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # starts real processes

TINY = ["--rounds", "2", "--clients", "3", "--samples", "600", "--epochs", "1", "--no-progress"]


def _demo(run_dir: Path, cache: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "crossfed",
            "demo",
            *TINY,
            "--run-dir",
            str(run_dir),
            "--cache-dir",
            str(cache),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
        # A runner that started us in the background may have SIGINT ignored; the child
        # would inherit that and never see the Ctrl-C this file sends.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
    )


def _children(run_dir: Path) -> dict[str, int]:
    lines = (run_dir / "logs" / "pids.txt").read_text().split("\n")
    return {name: int(pid) for name, pid in (line.split() for line in lines if line)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


@pytest.mark.long  # over ~20 s on 2 cores: .ci/run's own stage
def test_demo_runs_federation_and_writes_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _demo(run_dir, tmp_path / "cache", "--timeout-s", "400")
    out, _ = proc.communicate(timeout=480)
    assert proc.returncode == 0, out
    assert "| text only |" in out and "| image only |" in out and "| both present |" in out
    result = json.loads((run_dir / "result.json").read_text())
    assert result["final_state"] == "completed"
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    for r in result["rounds"]:
        for config in ("both", "text_only", "image_only"):
            assert 0.0 <= r["scores"][config]["accuracy"] <= 1.0
    assert sorted(result["clients"].values()) == ["both", "image_only", "text_only"]
    report = (run_dir / "report.md").read_text()
    assert "| round | uploads |" in report and "accuracy.png" in report
    assert (run_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    children = _children(run_dir)
    assert set(children) >= {"server", *result["clients"]}
    assert not [name for name, pid in children.items() if _alive(pid)]


def test_demo_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _demo(run_dir, tmp_path / "cache", "--timeout-s", "400")
    deadline = time.monotonic() + 120
    pids = run_dir / "logs" / "pids.txt"
    while time.monotonic() < deadline and not (pids.exists() and len(_children(run_dir)) >= 4):
        time.sleep(0.2)
    assert pids.exists(), "demo never started its children"
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)  # an impatient second Ctrl-C must not cut cleanup short
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted" in out
    time.sleep(0.5)
    assert not [name for name, pid in _children(run_dir).items() if _alive(pid)]
