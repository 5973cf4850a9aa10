"""`crossfed client start`: registered in the root CLI, flags documented, bad input is one
clear line and exit code 2 (no stack trace)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # starts real processes


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crossfed", "client", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_the_edge_flags() -> None:
    out = _run("start", "--help")
    assert out.returncode == 0, out.stderr
    for flag in ("--server", "--data", "--modality", "--threads", "--cache-dir", "--insecure"):
        assert flag in out.stdout


def test_bad_server_address_is_one_line_exit_2(tmp_path: Path) -> None:
    out = _run("start", "--server", "nohost", "--insecure", "--state-dir", str(tmp_path))
    assert out.returncode == 2
    assert "server_address" in out.stderr and "host:port" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    out = _run("start", "--config", str(tmp_path / "nope.yaml"), "--state-dir", str(tmp_path))
    assert out.returncode == 2
    assert "file not found" in out.stderr and "Traceback" not in out.stderr


def test_missing_embedding_file_is_reported(tmp_path: Path) -> None:
    out = _run(
        "start",
        "--insecure",
        "--server",
        "127.0.0.1:1",
        "--data",
        str(tmp_path / "none.safetensors"),
        "--state-dir",
        str(tmp_path / "state"),
    )
    assert out.returncode == 2
    assert "none.safetensors" in out.stderr and "Traceback" not in out.stderr


def test_non_positive_dp_sgd_epsilon_is_one_line_exit_2(tmp_path: Path) -> None:
    out = _run("start", "--dp-sgd-epsilon", "0", "--insecure", "--state-dir", str(tmp_path))
    assert out.returncode == 2
    assert "dp_sgd_target_epsilon" in out.stderr and "Traceback" not in out.stderr


def test_manifest_clients_are_told_where_modality_comes_from(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,text,label\n,a cat,cat\n")
    out = _run("start", "--data", str(manifest), "--modality", "text_only", "--insecure")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "each row's modalities come from its cells" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = _run("start", "--data", "builtin", "--skip-bad-rows", "--insecure")
    assert out.returncode == 2 and "applies to a manifest" in out.stderr


def test_bad_sd_checkpoint_is_one_line_exit_2_before_any_data(tmp_path: Path) -> None:
    out = _run(
        "start",
        "--insecure",
        "--server",
        "127.0.0.1:1",
        "--sd-checkpoint",
        str(tmp_path / "no-sd"),
        "--sd-device",
        "cpu",
        "--state-dir",
        str(tmp_path / "state"),
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert "no model_index.json" in lines[-1] and "Traceback" not in out.stderr
    assert "local data" not in out.stdout  # refused before encoding anything
