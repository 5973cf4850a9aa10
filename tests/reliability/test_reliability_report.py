"""write_report.py renders only what the suite recorded: numbers from the JSON records appear,
missing scenarios say 'not run', and an empty results dir is an error, not an empty report."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.reliability.write_report import main, render


def test_report_shows_recorded_numbers_and_marks_missing_ones(tmp_path: Path) -> None:
    results = {
        "fuzz_coordinator_fast": {
            "cases": 321,
            "improper": 0,
            "statuses": {"OK": 7},
            "per_rpc": {"/x/Y": 321},
            "recorded_unix_s": 0.0,
        },
        "load_200x2": {"clients": 200, "rounds": 2, "rpc_p99_ms": 12.5, "retried": {}},
        "attack_replay": {
            "attempt": "replay a | b",
            "expected": "refused",
            "observed": "UNAUTHENTICATED: nonce was already used",
        },
    }
    text = render(results)
    assert "| replay | replay a \\| b | refused | UNAUTHENTICATED: nonce was already used |" in text
    assert "1 held" in text
    assert "321 cases, 0 improper answers" in text
    assert "200 concurrent clients x 2 rounds" in text
    assert "12.5" in text
    assert "0 in 0 runs" in text  # no server-kill record
    assert text.count("not run") >= 3  # kills, client faults, network, disk
    assert "## Attacks" in render({"fuzz_x": {"cases": 1}}) and "not run" in render({"x": {}})


def test_report_cli_writes_file_and_refuses_empty_results(tmp_path: Path) -> None:
    out = tmp_path / "R.md"
    assert main(["--results", str(tmp_path / "none"), "--out", str(out)]) == 1
    assert not out.exists()
    results = tmp_path / "res"
    results.mkdir()
    (results / "server_kill_fast.json").write_text(
        json.dumps(
            {"faults": ["db_commit"], "restarts": 4, "round_attempts": 7, "committed_rounds": 3}
        )
    )
    assert main(["--results", str(results), "--out", str(out)]) == 0
    assert "4 in 1 runs" in out.read_text()
