"""The systems benchmark suite runs end to end on a tiny configuration and emits well-formed
JSON, markdown (its own BENCHMARKS.md section only) and PNG plots. No timing thresholds."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "systems" / "run_systems.py"
sys.path.insert(0, str(REPO / "benchmarks"))

from systems.measurement_records import SuiteRun
from systems.report_writer import (
    SECTION_END,
    SECTION_START,
    ReportError,
    write_section,
)

SMOKE_KEYS = {
    "fedavg_throughput",
    "upload_encrypted",
    "upload_encryption_cost",
    "download_chunked",
    "upload_encrypted_in_process",
    "upload_encryption_cost_in_process",
    "download_chunked_in_process",
    "coordination_2_clients",
    "server_peak_rss_2_clients",
    "client_encoding_cached",
    "client_training_throughput",
}
QUALITY = "<!-- quality:start -->\n## Quality\nkept as is\n<!-- quality:end -->\n"


def _finite_positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.long  # over ~20 s on 2 cores: .ci/run's own stage
@pytest.mark.integration
def test_smoke_suite_emits_json_markdown_and_plots(tmp_path: Path) -> None:
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text(f"# Benchmarks\n\n{QUALITY}\n{SECTION_START}\nstale\n{SECTION_END}\n")
    out_json = tmp_path / "systems.json"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--profile",
            "smoke",
            "--json",
            str(out_json),
            "--plots-dir",
            str(tmp_path / "plots"),
            "--markdown",
            str(markdown),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=170,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    result = json.loads(out_json.read_text())
    assert result["suite"] == "systems" and result["profile"] == "smoke"
    assert result["failures"] == {}
    assert "demo" in result["skipped"]
    assert result["machine"]["cpus"] >= 1
    by_key = {m["key"]: m for m in result["measurements"]}
    assert set(by_key) == SMOKE_KEYS
    for m in by_key.values():
        assert _finite_positive(m["value"]), m
        assert _finite_positive(m["baseline"]), m
        assert math.isclose(m["ratio"], _expected_ratio(m), rel_tol=1e-9), m
        assert m["samples"] and all(_finite_positive(s) for s in m["samples"]), m
        assert m["load"]["before"] >= 0 and m["load"]["after"] >= 0
        if m["target"] is None:
            assert m["target_met"] is None
        else:
            assert isinstance(m["target_met"], bool) and m["target_text"]
    assert SuiteRun.from_json(result).to_json() == result  # --render-only reads it back
    coordination = by_key["coordination_2_clients"]["details"]
    assert coordination["timed_rounds"] == 1
    memory = by_key["server_peak_rss_2_clients"]["details"]
    assert memory["round_peak_mb"] >= memory["rss_after_round_mb"] > 0

    text = markdown.read_text()
    assert QUALITY in text  # another suite's section is untouched
    assert text.count(SECTION_START) == 1 and text.count(SECTION_END) == 1
    section = text.split(SECTION_START)[1].split(SECTION_END)[0]
    assert "stale" not in section
    assert "| figure | value | baseline (same run) | ratio |" in section
    for m in by_key.values():
        assert m["title"] in section
        assert m["title"] in done.stdout  # the table is printed as well

    plots = sorted((tmp_path / "plots").glob("*.png"))
    assert {p.name for p in plots} >= {"systems_coordination.png", "systems_ratios.png"}
    for plot in plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _expected_ratio(m: dict[str, float]) -> float:
    """The ratio each figure defines, recomputed from its value and baseline."""
    key = str(m["key"])
    if key.startswith("server_peak_rss"):
        return m["value"] * 1e6 / m["details"]["model_bytes"]  # type: ignore[index]
    if key == "client_encoding_cached":
        return m["baseline"] / m["value"]
    if key.startswith("coordination"):
        return m["value"] / m["baseline"]
    return m["value"] / m["baseline"]


def test_write_section_creates_then_replaces_only_its_own_block(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    write_section(path, "## Systems\nfirst")
    assert path.read_text().count(SECTION_START) == 1
    path.write_text(path.read_text() + "\n" + QUALITY)
    write_section(path, "## Systems\nsecond")
    text = path.read_text()
    assert "second" in text and "first" not in text and QUALITY in text


@pytest.mark.parametrize(
    "broken",
    [f"{SECTION_START}\nno end\n", f"{SECTION_END}\n{SECTION_START}\n", SECTION_START * 2],
)
def test_write_section_refuses_broken_markers(tmp_path: Path, broken: str) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(broken)
    with pytest.raises(ReportError, match="marker"):
        write_section(path, "## Systems\nx")
    assert path.read_text() == broken  # nothing half-written
