"""The quality suite's extra axes (issue 18), on the simulator like the main grid:

- ``strategies``: ours under each server strategy (``--strategies fedavg,fedavgm,...``: names
  of the server's strategy registry; ``fedprox`` = FedAvg with the clients' proximal term
  ``--proximal-mu``) at per-client missingness over rates, plus the headline cell, with the
  central unimodal ceilings as references;
- ``attacks``: k of N clients sending scaled (×100), sign-flipped or withheld (θ_g) updates,
  per strategy;
- ``defaults``: rounds × local epochs × lr for ours with FedAvg (accuracy against wall time).

Every suite runs on a dataset: ``builtin`` (synthetic shapes) or ``swatches`` (the fabric
swatches manifest, benchmarks/datasets/fabric_swatches.py), each encoded once and cached.
Records are JSON lines (benchmarks/results/quality_<suite>[_<dataset>].jsonl); the section of
BENCHMARKS.md between the quality-axes markers and its PNGs are rebuilt from every records
file on hand.

    python benchmarks/quality/run_axes.py strategies [--strategies ...] [--seeds 0 1 2]
    python benchmarks/quality/run_axes.py defaults --dataset swatches --rounds-grid 10 20 ...
    python benchmarks/quality/run_axes.py report
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Literal

_BENCHMARKS = Path(__file__).resolve().parents[1]
_REPO = _BENCHMARKS.parent
if str(_BENCHMARKS) not in sys.path:  # `quality.*` is a folder of scripts, not a package
    sys.path.insert(0, str(_BENCHMARKS))

from crossfed.common.config import ConfigError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from crossfed.simulation.byzantine import AttackKind
from crossfed.simulation.federation_data import FederationSetup
from crossfed.simulation.simulation_errors import SimulationError
from quality.axes_plan import AttackPlan, DefaultsPlan, StrategyPlan, budget_grid
from quality.axes_report import (
    AXES_END,
    AXES_START,
    attack_summary,
    attack_table,
    attack_targets,
    ceiling_lines,
    central_references,
    defaults_reading,
    defaults_summary,
    defaults_table,
    plot_defaults,
    plot_strategies,
    strategy_summary,
    strategy_table,
    strategy_targets,
)
from quality.quality_errors import QualityBenchmarkError
from quality.quality_report import SECTION_END, write_section
from quality.sweep import GridSettings, Job, read_records, record_key, run_jobs

Suite = Literal["strategies", "attacks", "defaults", "report"]
Dataset = Literal["builtin", "swatches"]
DEFAULT_ATTACKS: tuple[AttackKind, ...] = ("scale", "sign_flip", "withhold")


class AxesSettings(BaseModel):
    """Validated command-line input."""

    model_config = ConfigDict(extra="forbid")

    suite: Suite
    dataset: Dataset = "builtin"
    samples: int | None = Field(None, gt=50, description="builtin 10,000; swatches 4,000")
    clients: int = Field(10, gt=0)
    rounds: int = Field(10, gt=0)
    local_epochs: int = Field(1, gt=0)
    lr: float = Field(2e-3, gt=0)
    central_epochs: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0)
    hidden_dim: int = Field(128, gt=0)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    strategies: list[str] = Field(
        default_factory=lambda: ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox"]
    )
    proximal_mu: float = Field(0.01, gt=0)
    rates: list[float] = Field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9], min_length=1)
    alpha: float = Field(0.1, gt=0)
    attacks: list[AttackKind] = Field(default_factory=lambda: list(DEFAULT_ATTACKS))
    attackers: int = Field(2, ge=1)
    rounds_grid: list[int] = Field(default_factory=lambda: [10, 20])
    epochs_grid: list[int] = Field(default_factory=lambda: [1, 2, 5])
    lr_grid: list[float] = Field(default_factory=lambda: [1e-3, 2e-3, 5e-3])
    max_epochs_total: int = Field(100, gt=0, description="prune budgets over rounds x epochs")
    workers: int = Field(2, gt=0)
    num_cpus: int | None = Field(None, gt=0)
    backend: Literal["ray", "inline"] = "ray"
    deadline_s: float | None = Field(None, gt=0)
    embeddings: Path | None = None
    cache_dir: Path = _REPO / ".crossfed" / "cache"
    results_dir: Path = _BENCHMARKS / "results"
    records: Path | None = None
    reuse: Path | None = Field(
        None, description="records of the main grid: runs already there are copied, not rerun"
    )
    benchmarks_md: Path = _REPO / "BENCHMARKS.md"
    note: str = ""
    progress: bool = True

    @model_validator(mode="after")
    def _attackers_fit(self) -> AxesSettings:
        if self.attackers > self.clients:
            raise ValueError(
                f"attack.clients {self.attackers} exceeds federation.clients {self.clients}"
            )
        return self

    def sample_count(self) -> int:
        return self.samples or (10_000 if self.dataset == "builtin" else 4_000)

    def records_path(self) -> Path:
        if self.records is not None:
            return self.records
        suffix = "" if self.dataset == "builtin" else f"_{self.dataset}"
        return self.results_dir / f"quality_{self.suite}{suffix}.jsonl"

    def headline(self) -> FederationSetup:
        return FederationSetup("per_sample", 0.5, 0.5, self.clients, 0)


def prepare_dataset(s: AxesSettings) -> Path:
    """The dataset's embedding file (built and encoded once, then reused)."""
    if s.embeddings is not None:
        if not s.embeddings.is_file():
            raise QualityBenchmarkError(f"embeddings file not found: {s.embeddings}")
        return s.embeddings
    from crossfed.simulation.experiment import BuiltinSimData, ManifestSimData
    from crossfed.simulation.federation_data import load_data

    n = s.sample_count()
    cache = s.results_dir / ".cache"
    if s.dataset == "builtin":
        path = cache / f"quality-embeddings-{n}.safetensors"
        if not path.is_file():
            load_data(
                BuiltinSimData(num_samples=n, cache_dir=s.cache_dir), s.progress
            ).embeddings.save(path)
        return path
    from datasets.fabric_swatches import SwatchConfig, class_names, write_manifest

    path = cache / f"quality-embeddings-swatches-{n}.safetensors"
    if not path.is_file():
        manifest = write_manifest(cache / f"fabric-swatches-{n}-seed0", SwatchConfig(num_samples=n))
        spec = ManifestSimData(
            kind="manifest", path=manifest, class_names=class_names(), cache_dir=s.cache_dir
        )
        load_data(spec, s.progress).embeddings.save(path)
    return path


def plan(s: AxesSettings) -> list[Job]:
    seeds = tuple(s.seeds)
    if s.suite == "strategies":
        return StrategyPlan(
            tuple(s.strategies),
            tuple(s.rates),
            s.alpha,
            s.headline(),
            seeds,
            s.clients,
            s.proximal_mu,
        ).jobs()
    if s.suite == "attacks":
        return AttackPlan(
            tuple(s.strategies), tuple(s.attacks), s.attackers, s.headline(), seeds
        ).jobs()
    budgets = budget_grid(s.rounds_grid, s.epochs_grid, s.lr_grid, s.max_epochs_total)
    return DefaultsPlan(budgets, s.headline(), seeds).jobs()


def reuse_records(jobs: list[Job], source: Path, records: Path) -> int:
    """Copy into ``records`` the runs of ``jobs`` that ``source`` (the main grid's records,
    same code and settings) already holds, marked ``reused_from``; returns how many."""
    done = {record_key(r) for r in read_records(records)}
    wanted = {j.key() for j in jobs} - done
    found = [r for r in read_records(source) if record_key(r) in wanted]
    if found:
        records.parent.mkdir(parents=True, exist_ok=True)
        with records.open("a") as sink:
            for r in found:
                sink.write(json.dumps({**r, "reused_from": source.name}, allow_nan=True) + "\n")
    return len(found)


def grid_of(s: AxesSettings, embeddings: Path) -> GridSettings:
    return GridSettings(
        embeddings=embeddings.resolve(),
        test_fraction=0.2,
        hidden_dim=s.hidden_dim,
        rounds=s.rounds,
        local_epochs=s.local_epochs,
        central_epochs=s.central_epochs,
        batch_size=s.batch_size,
        lr=s.lr,
        modality_dropout=0.5,
        backend=s.backend,
        concurrent_runs=s.workers,
        dataset=s.dataset,
        num_cpus=s.num_cpus,
        eval_every=1000,  # only the final model is recorded; the last round always scores
    )


def build_section(s: AxesSettings) -> tuple[str, dict[str, object], list[Path]]:
    """The markdown section, its JSON document and plots, from every records file on hand."""
    res = s.results_dir
    strat = strategy_summary(read_records(res / "quality_strategies.jsonl"))
    attacks = attack_summary(read_records(res / "quality_attacks.jsonl"))
    budget_records = [
        *read_records(res / "quality_defaults.jsonl"),
        *read_records(res / "quality_defaults_swatches.jsonl"),
    ]
    defaults = defaults_summary(budget_records)
    plots = [
        p
        for p in (
            plot_strategies(strat, res / "quality_strategies.png"),
            plot_defaults(defaults, res / "quality_defaults.png"),
        )
        if p is not None
    ]
    lines = [
        "## Quality: strategies, byzantine clients and training budgets (issue 18)",
        "",
        (
            "Same simulator and settings as the grid above (10 clients, batch 64, hidden 128, "
            "central references 10 epochs), ours only; `benchmarks/quality/strategy_sweep.sh` "
            "and `defaults_sweep.sh` drive `run_axes.py`, records in "
            "`benchmarks/results/quality_{strategies,attacks,defaults,defaults_swatches}.jsonl`. "
            "Strategies are the server's own (server/strategies/, through the registry the "
            "simulator shares with `crossfed server`) with their constructors' defaults: "
            "FedAvgM server_lr 1, momentum 0.9; FedAdam / FedYogi server_lr 0.01, β 0.9 / 0.99, "
            "τ 0.001; FedProx = FedAvg with the clients' proximal term μ; trimmed mean drops "
            "20 % at each end; Krum (one upload kept) and Multi-Krum (all but f kept, "
            "averaged) are told f = the attacker count; the median-anchored mean drops "
            "uploads whose update has cosine <= 0 with the coordinate-wise median update and "
            "clips the rest to the median update norm; with `exclude_after` k (its default, 2) "
            "it also leaves out of later rounds a client it dropped in k rounds, at least half "
            "of those it took part in (`exclude_after 0` rows: the per-round rule alone, run "
            "before the record existed). In every clean run here (headline cell and per-client "
            "α 0.1, 3 seeds) the two give identical accuracies: no honest client was left out. "
            "`logit_adjustment` τ: FedAvg whose clients train on logits shifted by τ log(their "
            "label prior) (FedLC; τ 0.6 and 1.0 did worse at per-client 0.5, α 0.1: text-only "
            "-1.4 and -4.5 points). "
            "Byzantine clients (crossfed/simulation/byzantine.py) are a seeded draw per seed and "
            "poison every update after honest local training (``withhold``: they send the "
            "global model back, so their data never reaches the weights: what losing those "
            "clients costs, the floor for any rule that excludes them). Mean ± std over the seeds "
            "listed; Δ and gap closure are per seed (same federation), then averaged. Runs the "
            "main grid already held (FedAvg's ours and the central ceilings at the same cells "
            "and seeds) were copied from `quality_records.jsonl`, not rerun (a rerun of the "
            "headline seed 0 matched it within 0.05 points)."
        ),
        "",
        (
            "Second dataset, **fabric swatches** (`benchmarks/datasets/fabric_swatches.py`, "
            "4,000 rows, seed 0, written as a CSV manifest + PNGs and loaded through the "
            "manifest loader): procedural textures, 6 patterns × 2 scales = 12 classes, random "
            "colours, noise and a fold shadow; shop-listing captions that name the pattern "
            "65 % of the time (20 % a word shared by two patterns, else nothing) and the "
            "scale 40 %; 4 % of labels redrawn at random. Unrelated to the built-in shapes "
            "(whole-image textures vs one object; the label is pattern × scale, colour "
            "carries nothing)."
        ),
        "",
        *([s.note, ""] if s.note else []),
    ]
    if strat:
        lines += [
            "### Strategies (10 rounds × 1 local epoch, lr 0.002)",
            "",
            "![strategies](benchmarks/results/quality_strategies.png)",
            "",
            *strategy_table(strat),
            "",
            *ceiling_lines(strat),
            "",
            (
                "Targets (issue 18: per-client α 0.1, rates 0.3–0.9, close ≥ half of FedAvg's gap "
                "to the central ceiling on text-only and image-only and lift paired; no cell more "
                "than 0.5 points under FedAvg):"
            ),
            "",
            *strategy_targets(strat),
            "",
        ]
    if attacks:
        lines += [
            "### Byzantine clients (headline cell: per-sample 0.5, α 0.5)",
            "",
            *attack_table(attacks),
            "",
            *attack_targets(attacks),
            "",
        ]
    if defaults:
        lines += [
            "### Training budget: rounds × local epochs × lr (ours, FedAvg, headline cell)",
            "",
            "![defaults](benchmarks/results/quality_defaults.png)",
            "",
            *defaults_table(defaults),
            "",
            *defaults_reading(defaults, (10, 1, 2e-3)),
            *central_references(budget_records),
            "",
        ]
    doc: dict[str, object] = {
        "strategies": {
            f"{cell}": {label: _jsonable(row) for label, row in by.items()}
            for cell, by in strat.items()
        },
        "attacks": {
            strat_name: {a: _jsonable(row) for a, row in by.items()}
            for strat_name, by in attacks.items()
        },
        "defaults": [_jsonable(r) for r in defaults],
        "plots": [str(p) for p in plots],
    }
    return "\n".join(lines), doc, plots


def _jsonable(row: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in row.items():
        as_dict = getattr(v, "as_dict", None)
        out[k] = as_dict() if callable(as_dict) else v
    return out


def parse(argv: list[str] | None) -> AxesSettings:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("suite", choices=["strategies", "attacks", "defaults", "report"])
    p.add_argument("--dataset", choices=["builtin", "swatches"])
    p.add_argument("--samples", type=int)
    p.add_argument("--clients", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--central-epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--hidden-dim", type=int)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--strategies", type=lambda v: [x for x in v.split(",") if x])
    p.add_argument("--proximal-mu", type=float)
    p.add_argument("--rates", type=float, nargs="+")
    p.add_argument("--alpha", type=float)
    p.add_argument("--attacks", type=lambda v: [x for x in v.split(",") if x])
    p.add_argument("--attackers", type=int)
    p.add_argument("--rounds-grid", type=int, nargs="+")
    p.add_argument("--epochs-grid", type=int, nargs="+")
    p.add_argument("--lr-grid", type=float, nargs="+")
    p.add_argument("--max-epochs-total", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--num-cpus", type=int)
    p.add_argument("--backend", choices=["ray", "inline"])
    p.add_argument("--deadline-s", type=float)
    p.add_argument("--embeddings", type=Path)
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--results-dir", type=Path)
    p.add_argument("--records", type=Path)
    p.add_argument("--reuse", type=Path, help="main grid records: matching runs are copied")
    p.add_argument("--benchmarks-md", type=Path)
    p.add_argument("--note")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    try:
        return AxesSettings(**args)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise QualityBenchmarkError(f"invalid settings: {where}: {first['msg']}") from exc


def main(argv: list[str] | None = None) -> int:
    try:
        s = parse(argv)
        s.results_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if s.suite != "report":
            embeddings = prepare_dataset(s)
            jobs = plan(s)
            if s.reuse is not None and s.dataset == "builtin":
                print(f"reused {reuse_records(jobs, s.reuse, s.records_path())} runs", flush=True)
            cache = s.results_dir / ".cache" / "experiments" / f"{s.suite}-{s.dataset}"
            run_jobs(
                jobs, s.records_path(), grid_of(s, embeddings), cache, s.deadline_s, s.progress
            )
        body, doc, _ = build_section(s)
        doc["wall_s"] = time.perf_counter() - start
        (s.results_dir / "quality_axes.json").write_text(json.dumps(doc, indent=2, allow_nan=True))
        write_section(s.benchmarks_md, body, AXES_START, AXES_END, after=SECTION_END)
        print(body)
        return 0
    except (QualityBenchmarkError, SimulationError, ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
