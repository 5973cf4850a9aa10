"""benchmarks/quality/drift_remedies.py: per-seed deltas and gap closure against ours on the
same federation, and the grid check that names a cell where a remedy loses ground."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from quality.drift_remedies import collect, grid_check, table


def _record(
    method: str, miss: str, rate: float, alpha: float, seed: int, acc: tuple[float, float, float]
) -> dict[str, Any]:
    scores = {
        c: {"accuracy": a, "macro_f1": a} for c, a in zip(("text_only", "image_only", "both"), acc)
    }
    setup = {"missingness": miss, "rate": rate, "alpha": alpha, "clients": 10, "seed": seed}
    return {"setup": setup, "method": method, "scores": scores, "seconds": 1.0}


def _write(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_closure_is_per_seed_against_ours_and_a_losing_cell_is_named(tmp_path: Path) -> None:
    grid, remedy = [], []
    for seed in (0, 1, 2):
        grid += [
            _record("ours", "per_client", 0.5, 0.1, seed, (0.60, 0.60, 0.90)),
            _record("ceiling_text", "per_client", 0.5, 0.1, seed, (0.80, 0.10, 0.80)),
            _record("ceiling_image", "per_client", 0.5, 0.1, seed, (0.10, 0.70, 0.70)),
            _record("ours", "per_sample", 0.5, 5.0, seed, (0.75, 0.75, 0.99)),
        ]
        remedy += [
            _record("ours_calibrated_both", "per_client", 0.5, 0.1, seed, (0.70, 0.70, 0.90)),
            _record("ours_calibrated_both", "per_sample", 0.5, 5.0, seed, (0.74, 0.75, 0.99)),
        ]
    _write(tmp_path / "quality_records.jsonl", grid)
    _write(tmp_path / "quality_ours_calibrated_both.jsonl", remedy)
    summary = collect(tmp_path)
    row = summary[("per_client", 0.5, 0.1)]["ours_calibrated_both"]
    assert [round(x, 6) for x in row.closure[0]] == [0.5, 1.0]  # 10 of 20 points, 10 of 10
    assert [round(x, 6) for x in row.delta[0]] == [10.0, 10.0, 0.0]
    lines = table(summary)
    assert any("CCVR, both paths" in line and "+10.0 / +10.0 / +0.0" in line for line in lines)
    check = grid_check("ours_calibrated_both", tmp_path)
    assert check is not None
    assert "text_only -1.0 (per-sample 0.5 / α 5)" in check
    assert check.endswith("configuration: per-sample 0.5 / α 5.")


def test_no_grid_check_from_a_single_cell(tmp_path: Path) -> None:
    _write(
        tmp_path / "quality_records.jsonl",
        [_record("ours", "per_sample", 0.5, 5.0, 0, (0.7, 0.7, 0.9))],
    )
    _write(
        tmp_path / "quality_ours_calibrated_both.jsonl",
        [_record("ours_calibrated_both", "per_sample", 0.5, 5.0, 0, (0.7, 0.7, 0.9))],
    )
    assert grid_check("ours_calibrated_both", tmp_path) is None
    assert grid_check("ours_fixed_classifier", tmp_path) is None  # no records at all
    with pytest.raises(KeyError):
        collect(tmp_path)["per_sample", 0.5, 5.0]["ours"]
