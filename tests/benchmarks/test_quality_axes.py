"""The quality suite's extra axes (benchmarks/quality/run_axes.py): run variants keep their
own record keys, the plans hold what the sweeps promise, the summaries compute gap closure
and attack deltas per seed as documented (hand examples), and a tiny run of each suite goes
end to end (inline clients) into its own BENCHMARKS.md section."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from quality.axes_plan import AttackPlan, StrategyPlan, budget_grid, strategy_variant
from quality.axes_report import (
    AXES_END,
    AXES_START,
    attack_summary,
    defaults_reading,
    defaults_summary,
    strategy_summary,
    strategy_targets,
)
from quality.quality_report import SECTION_END, SECTION_START, write_section
from quality.run_axes import main
from quality.sweep import (
    DEFAULT_VARIANT,
    GridSettings,
    Job,
    RunVariant,
    experiment_of,
    record_key,
)

from crossfed.simulation.experiment import ExperimentConfig
from crossfed.simulation.federation_data import FederationSetup
from tests.support.simulation_data import clustered_embeddings

HEAD = FederationSetup("per_sample", 0.5, 0.5, 10, 0)


def _record(
    method: str,
    setup: FederationSetup,
    acc: float,
    variant: RunVariant = DEFAULT_VARIANT,
    **kw: Any,
) -> dict[str, Any]:
    scores = {c: {"accuracy": acc, "macro_f1": acc} for c in ("text_only", "image_only", "both")}
    out: dict[str, Any] = {
        "setup": {
            "missingness": setup.missingness,
            "rate": setup.rate,
            "alpha": setup.alpha,
            "clients": setup.clients,
            "seed": setup.seed,
        },
        "method": method,
        "scores": scores,
        "seconds": kw.get("seconds", 1.0),
    }
    if variant != DEFAULT_VARIANT:
        out["variant"] = {
            **variant.__dict__,
            "strategy_params": [list(p) for p in variant.strategy_params],
        }
    if "dataset" in kw:
        out["dataset"] = kw["dataset"]
    return out


def test_variants_have_their_own_keys_and_the_default_keeps_the_grids() -> None:
    plain = Job(HEAD, "ours", "sweep")
    assert plain.key() == "ours|per_sample|0.5|0.5|10|0"
    variants = [
        RunVariant(strategy="fedavgm"),
        RunVariant(strategy="fedavgm", strategy_params=(("momentum", 0.5),)),
        RunVariant(proximal_mu=0.01),
        RunVariant(attack="scale", attackers=2),
        RunVariant(attack="sign_flip", attackers=2),
        RunVariant(rounds=20, local_epochs=5, lr=5e-3),
    ]
    keys = {Job(HEAD, "ours", "x", v).key() for v in variants}
    assert len(keys) == len(variants) and plain.key() not in keys
    for v in variants:  # a record of the job reads back as the same key (resumed sweeps)
        assert record_key(_record("ours", HEAD, 0.5, v)) == Job(HEAD, "ours", "x", v).key()
    assert strategy_variant("fedprox", 0.1) == RunVariant(proximal_mu=0.1)


def test_experiment_files_carry_the_variant(tmp_path: Path) -> None:
    grid = GridSettings(tmp_path / "e.safetensors", 0.2, 32, 10, 1, 2, 64, 2e-3, 0.5)
    doc = experiment_of(
        HEAD, ["ours"], grid, RunVariant(attack="scale", attackers=2, rounds=20, lr=5e-3)
    )
    cfg = ExperimentConfig.model_validate(doc)
    assert cfg.attack.kind == "scale" and cfg.attack.clients == 2
    assert cfg.rounds.rounds == 20 and cfg.train.lr == 5e-3 and cfg.train.local_epochs == 1
    assert cfg.strategy.name == "fedavg" and cfg.strategy.params == {}
    plain = experiment_of(HEAD, ["ours"], grid)
    assert plain["name"] != doc["name"] and "attack" not in plain


def test_plans_cover_the_sweeps() -> None:
    plan = StrategyPlan(
        ("fedavg", "fedavgm", "fedprox"), (0.3, 0.9), 0.1, HEAD, (0, 1), 10, proximal_mu=0.01
    )
    jobs = plan.jobs()
    ours = [j for j in jobs if j.method == "ours"]
    assert len(ours) == 2 * 3 * 3  # seeds x (2 per-client cells + headline) x strategies
    assert {j.variant.proximal_mu for j in ours} == {0.0, 0.01}
    refs = [j for j in jobs if j.method != "ours"]
    assert len(refs) == 2 * 3 * 2 and len({j.key() for j in jobs}) == len(jobs)
    assert [j.setup.seed for j in jobs] == sorted(j.setup.seed for j in jobs)  # seed by seed
    attacks = AttackPlan(("fedavg", "median"), ("scale", "sign_flip"), 2, HEAD, (0,)).jobs()
    assert len(attacks) == 2 * 3
    assert {(j.variant.attack, j.variant.attackers) for j in attacks} == {
        ("none", 0),
        ("scale", 2),
        ("sign_flip", 2),
    }
    grid = budget_grid([10, 20], [1, 2, 5], [2e-3], max_epochs_total=40)
    assert [(r, e) for r, e, _ in grid] == [(10, 1), (10, 2), (20, 1), (20, 2)]


def test_strategy_summary_gap_closure_by_hand() -> None:
    cell = FederationSetup("per_client", 0.5, 0.1, 10, 0)
    records = [
        _record("ours", cell, 0.60),
        _record("ours", cell, 0.70, RunVariant(strategy="fedavgm")),
        _record("ours", cell, 0.55, RunVariant(proximal_mu=0.01)),
        _record("ceiling_text", cell, 0.80),
        _record("ceiling_image", cell, 0.80),
    ]
    summary = strategy_summary(records)
    row = summary[("per_client", 0.5, 0.1)]["fedavgm"]
    assert row["delta:text_only"].mean == pytest.approx(0.10)
    assert row["closure:image_only"].mean == pytest.approx(0.5)  # (0.70-0.60)/(0.80-0.60)
    assert row["ceiling:text_only"].mean == pytest.approx(0.80)
    prox = summary[("per_client", 0.5, 0.1)]["fedprox (μ 0.01)"]
    assert prox["closure:text_only"].mean == pytest.approx(-0.25)
    targets = "\n".join(strategy_targets(summary))
    assert "fedavgm: text_only closure 0.50 (met)" in targets
    assert "fedprox (μ 0.01): text_only closure -0.25 (NOT met)" in targets


def test_attack_and_defaults_summaries_by_hand() -> None:
    runs = [
        _record("ours", HEAD, 0.80),
        _record("ours", HEAD, 0.10, RunVariant(attack="scale", attackers=2)),
        _record("ours", HEAD, 0.79, RunVariant(strategy="median")),
        _record("ours", HEAD, 0.785, RunVariant(strategy="median", attack="scale", attackers=2)),
    ]
    s = attack_summary(runs)
    assert s["fedavg"]["scale ×2"]["vs_clean:both"].mean == pytest.approx(-0.70)
    assert s["median"]["scale ×2"]["vs_clean:both"].mean == pytest.approx(-0.005)
    assert s["median"]["scale ×2"]["vs_fedavg:text_only"].mean == pytest.approx(-0.015)
    budget = [
        _record("ours", HEAD, 0.70, RunVariant(rounds=10, local_epochs=1, lr=2e-3), seconds=10),
        _record("ours", HEAD, 0.80, RunVariant(rounds=10, local_epochs=5, lr=2e-3), seconds=30),
        _record("ours", HEAD, 0.799, RunVariant(rounds=20, local_epochs=1, lr=2e-3), seconds=20),
    ]
    rows = defaults_summary(budget)
    assert len(rows) == 3 and all(r["dataset"] == "builtin" for r in rows)
    reading = defaults_reading(rows, (10, 1, 2e-3))[0]
    assert "best 10 rounds × 5 epochs, lr 0.002 +10.0 ± 0.0 (1 seeds" in reading
    assert "of it: 20 rounds × 1 epochs, lr 0.002 +9.9 ± 0.0 (1 seeds, 20 s/run)" in reading
    assert math.isclose(rows[0]["seconds"].mean, 10.0)


def test_section_goes_after_the_quality_section(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# B\n\n{SECTION_START}\nQ\n{SECTION_END}\n\n## Simulation\nS\n")
    write_section(md, "AXES 1", AXES_START, AXES_END, after=SECTION_END)
    write_section(md, "AXES 2", AXES_START, AXES_END, after=SECTION_END)
    text = md.read_text()
    assert text.index(SECTION_END) < text.index(AXES_START) < text.index("## Simulation")
    assert "AXES 2" in text and "AXES 1" not in text and text.count(AXES_START) == 1


def test_tiny_suites_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    emb = tmp_path / "emb.safetensors"
    clustered_embeddings(360).save(emb)
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# B\n\n{SECTION_START}\nQ\n{SECTION_END}\n")
    common = [
        "--embeddings",
        str(emb),
        "--results-dir",
        str(tmp_path / "res"),
        "--benchmarks-md",
        str(md),
        "--clients",
        "3",
        "--hidden-dim",
        "16",
        "--central-epochs",
        "1",
        "--seeds",
        "0",
        "--backend",
        "inline",
        "--no-progress",
    ]
    assert (
        main(
            [
                "defaults",
                *common,
                "--rounds-grid",
                "1",
                "2",
                "--epochs-grid",
                "1",
                "--lr-grid",
                "0.002",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "attacks",
                *common,
                "--rounds",
                "1",
                "--strategies",
                "fedavg",
                "--attacks",
                "scale",
                "--attackers",
                "1",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in (tmp_path / "res" / "quality_attacks.jsonl").open()]
    assert {r["variant"]["attack"] if "variant" in r else "none" for r in records} == {
        "none",
        "scale",
    }
    text = md.read_text()
    assert AXES_START in text and "### Byzantine clients" in text and "### Training budget" in text
    assert (tmp_path / "res" / "quality_defaults.png").is_file()
    doc = json.loads((tmp_path / "res" / "quality_axes.json").read_text())
    assert len(doc["defaults"]) == 2 and "fedavg" in doc["attacks"]
    assert "| fedavg | scale ×1 | 1 |" in capsys.readouterr().out
    assert main(["attacks", *common, "--attackers", "4"]) == 2  # more attackers than clients
    assert "attack.clients 4 exceeds" in capsys.readouterr().err
