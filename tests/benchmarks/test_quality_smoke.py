"""The federated quality suite runs end to end on a tiny configuration (synthetic clustered
embeddings, no encoders) through the simulator on an embedded Ray instance, its grid written
as experiment files, and emits well-formed JSON and markdown; gap-closure math on a hand
example. No accuracy thresholds."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from quality.quality_errors import QualityBenchmarkError
from quality.quality_report import SECTION_END, SECTION_START, write_section
from quality.run_quality import main
from quality.sweep import SweepPlan, plan_jobs

from crossfed.simulation.experiment import load_experiment
from crossfed.simulation.federation_data import FederationSetup
from crossfed.simulation.gap_closure import MeanStd, gap_closure, seed_summary
from tests.support.simulation_data import clustered_embeddings


def _same(acc: float) -> dict[str, dict[str, float]]:
    return {c: {"accuracy": acc, "macro_f1": acc} for c in ("text_only", "image_only", "both")}


def _summary(ceiling: float, **others: float) -> dict[str, dict[str, float]]:
    """One seed: ours 0.70, zero-fill 0.60, dropout 0.64, both ceilings at `ceiling`."""
    runs = {"ours": 0.70, "zero_fill": 0.60, "dropout": 0.64}
    runs |= {"ceiling_text": ceiling, "ceiling_image": ceiling, **others}
    return seed_summary({name: _same(acc) for name, acc in runs.items()})


def test_gap_closure_hand_example() -> None:
    # ours 0.70, zero-fill 0.60, dropout 0.64 -> best 0.64; ceiling 0.74 -> (0.06)/(0.10)
    assert gap_closure(0.70, 0.64, 0.74) == pytest.approx(0.6)
    assert math.isnan(gap_closure(0.70, 0.74, 0.74))  # no room at the ceiling
    row = _summary(0.74, no_mapper=0.69)
    assert row["text_only"]["best_baseline"] == pytest.approx(0.64)
    assert row["text_only"]["gap_closure"] == pytest.approx(0.6)
    assert row["image_only"]["gap_closure:no_mapper"] == pytest.approx(0.5)
    assert row["both"]["delta:no_mapper"] == pytest.approx(0.01)
    assert "gap_closure" not in row["both"]
    ms = MeanStd.of([0.5, 0.7, float("nan")])
    assert ms.n == 2 and ms.mean == pytest.approx(0.6) and ms.std == pytest.approx(0.1414, abs=1e-3)


def test_federated_ceiling_is_a_reference_not_an_ablation() -> None:
    row = _summary(0.80, fed_ceiling_text=0.72, fed_ceiling_image=0.68)
    # (0.70 - 0.64) / (0.72 - 0.64) against the federated ceiling, /0.16 against the central one
    assert row["text_only"]["fed_gap_closure"] == pytest.approx(0.75)
    assert row["image_only"]["fed_gap_closure"] == pytest.approx(1.5)
    assert row["text_only"]["gap_closure"] == pytest.approx(0.375)
    assert not any(
        k.endswith(("fed_ceiling_text", "fed_ceiling_image"))
        for k in row["both"]
        if k.startswith(("delta:", "gap_closure:"))
    )


def test_plan_dedupes_equivalent_runs() -> None:
    plan = SweepPlan(
        rates=(0.0, 0.5),
        missingness=("per_sample", "per_client"),
        alphas=(0.1, 5.0),
        seeds=(0,),
        clients=3,
        headline=FederationSetup("per_sample", 0.5, 0.1, 3, 0),
        headline_methods=("ours", "central_paired"),
        sweep_methods=("ours", "ceiling_text"),
    )
    keys = [j.key() for j in plan_jobs(plan)]
    assert len(keys) == len(set(keys))
    # rate 0: one run per alpha for both modes; per-sample ceilings shared across alphas
    assert sum(k.startswith("ours|") and "|0|" in k for k in keys) == 2
    assert sum(k.startswith("ceiling_text|per_sample|0.5|") for k in keys) == 1


def test_section_writer_keeps_other_sections(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# B\n\n<!-- systems:start -->\nSYS\n<!-- systems:end -->\n")
    write_section(md, "first")
    write_section(md, "second")
    text = md.read_text()
    assert "SYS" in text and "second" in text and "first" not in text
    assert text.count(SECTION_START) == 1 and text.count(SECTION_END) == 1
    md.write_text(f"{SECTION_END}\n{SECTION_START}\n")
    with pytest.raises(QualityBenchmarkError, match="markers"):
        write_section(md, "x")


@pytest.mark.long  # over ~20 s on 2 cores: .ci/run's own stage
@pytest.mark.integration
def test_smoke_suite_emits_json_markdown_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emb = tmp_path / "emb.safetensors"
    clustered_embeddings(480).save(emb)
    md = tmp_path / "BENCHMARKS.md"
    rc = main(
        [
            "--profile",
            "smoke",
            "--embeddings",
            str(emb),
            "--results-dir",
            str(tmp_path / "res"),
            "--benchmarks-md",
            str(md),
            "--no-progress",
        ]
    )
    assert rc == 0
    doc = json.loads((tmp_path / "res" / "quality.json").read_text())
    assert doc["simulator"]["backend"] == "ray" and doc["headline"]["seeds_used"] == [0]
    acc = doc["headline"]["accuracy"]
    for c in ("text_only", "image_only", "both"):
        for k in ("ours", "zero_fill", "dropout", "best_baseline", "no_exchange"):
            assert 0.0 <= acc[c][k]["mean"] <= 1.0
    assert "gap_closure" in acc["text_only"] and "central_paired" in acc["both"]
    assert 0.0 <= acc["image_only"]["fed_ceiling"]["mean"] <= 1.0
    assert "fed_gap_closure" in acc["text_only"] and "delta:fed_ceiling_text" not in acc["both"]
    assert {r["rate"] for r in doc["sweep"]} == {0.0, 0.5}
    assert all(Path(p).is_file() for p in doc["plots"]) and doc["plots"]
    text = md.read_text()
    assert SECTION_START in text and "| text_only |" in text and "### Targets" in text
    assert "### Headline" in capsys.readouterr().out
    # the grid ran as experiment files: one per federation setup, each a valid experiment
    files = sorted((tmp_path / "res" / ".cache" / "experiments").glob("*.yaml"))
    records = [json.loads(line) for line in (tmp_path / "res" / "quality_records.jsonl").open()]
    assert files and sum(len(load_experiment(f).methods) for f in files) == len(records)
    headline = load_experiment(
        tmp_path / "res/.cache/experiments/quality-per_sample-rate0.5-alpha0.5-clients3-seed0.yaml"
    )
    assert {"ours", "zero_fill", "dropout", "no_exchange"} <= set(headline.methods)
    assert headline.execution.backend == "ray" and headline.rounds.rounds == 1
    # report-only rebuilds the same section from the records on file
    assert (
        main(
            [
                "--profile",
                "smoke",
                "--report-only",
                "--results-dir",
                str(tmp_path / "res"),
                "--benchmarks-md",
                str(md),
                "--no-progress",
            ]
        )
        == 0
    )


def test_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--profile", "smoke", "--embeddings", str(tmp_path / "none.safetensors")]) == 2
    assert "embeddings file not found" in capsys.readouterr().err
    assert main(["--profile", "smoke", "--clients", "0", "--embeddings", "x"]) == 2
    assert "invalid settings" in capsys.readouterr().err
