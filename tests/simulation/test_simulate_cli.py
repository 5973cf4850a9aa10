"""`crossfed simulate` from the console script: an experiment file in, result.json,
report.md and accuracy.png out; a bad file or a missing Ray is one line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.simulation_data import experiment, write_embeddings

pytestmark = pytest.mark.integration  # starts real processes

CROSSFED = str(Path(sys.executable).with_name("crossfed"))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CROSSFED, *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_simulate_writes_results_report_and_plot(tmp_path: Path) -> None:
    emb = write_embeddings(tmp_path / "emb.safetensors")
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        yaml.safe_dump(
            experiment(emb, methods=["ours", "zero_fill", "dropout", "ceiling_text"], seeds=[0, 1])
        )
    )
    out = tmp_path / "out"
    proc = _run("simulate", str(exp), "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "result.json").read_text())
    assert [(r["method"], r["seed"]) for r in doc["runs"]] == [
        (m, s) for m in ("ours", "zero_fill", "dropout", "ceiling_text") for s in (0, 1)
    ]
    ours = doc["runs"][0]
    assert [r["round"] for r in ours["rounds"]] == [1, 2]
    assert set(ours["rounds"][1]["scores"]) == {"both", "text_only", "image_only"}
    summary = doc["summary"]["accuracy"]["text_only"]
    assert summary["ours"]["n"] == 2 and "gap_closure" in summary and "best_baseline" in summary
    assert doc["federations"]["0"]["client_sizes"] and doc["execution"]["backend"] == "inline"
    report = (out / "report.md").read_text()
    assert "per-sample missingness rate 0.5, Dirichlet α 0.5, 4 clients" in report
    assert "| text_only |" in report and "gap closure" in report
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| text_only |" in proc.stdout


def test_bad_experiment_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: {clients: -3}\n")
    proc = _run("simulate", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "federation.clients: Input should be greater than 0" in proc.stderr
    proc = _run("simulate", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_too_many_clients_for_the_data_is_one_line(tmp_path: Path) -> None:
    emb = write_embeddings(tmp_path / "emb.safetensors", n=100)
    exp = tmp_path / "exp.yaml"
    doc = experiment(emb, federation={"clients": 50, "min_samples_per_client": 5})
    exp.write_text(yaml.safe_dump(doc))
    proc = _run("simulate", str(exp), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot build the federation" in proc.stderr and "50 clients" in proc.stderr


def test_without_ray_simulate_says_how_to_install_it(tmp_path: Path) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: needs-ray\n")
    block_ray = (
        "import sys; sys.modules['ray'] = None; "  # `import ray` now raises ImportError
        "from crossfed.cli import main; sys.argv = ['crossfed'] + sys.argv[1:]; main()"
    )
    env_free = {k: v for k, v in os.environ.items() if not k.startswith("CROSSFED_SIM_")}
    proc = subprocess.run(
        [sys.executable, "-c", block_ray, "simulate", str(exp)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env_free,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "pip install 'crossfed[sim]'" in proc.stderr and "not installed" in proc.stderr
