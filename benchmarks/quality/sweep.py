"""The grid of runs: jobs (one method on one federation setup), their deduplication, and their
grouping into experiment files (one per federation setup) that the simulator runs
(`crossfed.simulation.experiment_run.run_experiment`, the code behind `crossfed simulate`) on
one shared Ray instance, appending each finished run to a JSON-lines file so an interrupted
sweep keeps its work."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from crossfed.simulation.experiment import ExperimentConfig
from crossfed.simulation.experiment_run import SeedFederation
from crossfed.simulation.federation_data import FederationSetup, LoadedData, Missingness
from crossfed.simulation.federation_run import RunRecord


@dataclass(frozen=True)
class Job:
    """One method trained and evaluated on one setup; `group` says which table it feeds."""

    setup: FederationSetup
    method: str
    group: str  # "headline", "sweep"

    def key(self) -> str:
        s = self.setup
        return f"{self.method}|{s.missingness}|{s.rate:g}|{s.alpha:g}|{s.clients}|{s.seed}"


@dataclass(frozen=True)
class SweepPlan:
    """What to run: the headline point (all methods) and the grid (ours vs baselines)."""

    rates: tuple[float, ...]
    missingness: tuple[Missingness, ...]
    alphas: tuple[float, ...]
    seeds: tuple[int, ...]
    clients: int
    headline: FederationSetup
    headline_methods: tuple[str, ...]
    sweep_methods: tuple[str, ...]


@dataclass(frozen=True)
class GridSettings:
    """What every experiment of the grid shares (the budget, the model, the data file, and
    where its clients run)."""

    embeddings: Path
    test_fraction: float
    hidden_dim: int
    rounds: int
    local_epochs: int
    central_epochs: int
    batch_size: int
    lr: float
    modality_dropout: float
    backend: Literal["ray", "inline"] = "ray"
    ray_address: str | None = None
    concurrent_runs: int = 1


def canonical(setup: FederationSetup, method: str) -> FederationSetup:
    """The setup whose run is identical to this one: at rate 0 both missingness modes give the
    same all-paired shards; central runs under per-sample masks do not depend on alpha (their
    canonical alpha 1.0 only feeds the unused partition)."""
    if setup.rate == 0.0:
        setup = FederationSetup("per_sample", 0.0, setup.alpha, setup.clients, setup.seed)
    if method.startswith("ceiling") and setup.missingness == "per_sample":
        setup = FederationSetup("per_sample", setup.rate, 1.0, setup.clients, setup.seed)
    if method == "central_paired":
        setup = FederationSetup("per_sample", 0.0, 1.0, setup.clients, setup.seed)
    return setup


def plan_jobs(plan: SweepPlan) -> list[Job]:
    """Jobs in priority order, so a sweep cut short still holds whole tables: the headline
    comparison (ours, baselines, references) for every seed, then seed by seed the headline
    ablations and the grid. Duplicates (see `canonical`) run once."""
    jobs: list[Job] = []
    seen: set[str] = set()

    def add(setup: FederationSetup, method: str, group: str) -> None:
        job = Job(canonical(setup, method), method, group)
        if job.key() not in seen:
            seen.add(job.key())
            jobs.append(job)

    h = plan.headline
    core = [m for m in plan.headline_methods if m in plan.sweep_methods or m == "central_paired"]
    for seed in plan.seeds:
        for method in core:
            add(
                FederationSetup(h.missingness, h.rate, h.alpha, h.clients, seed), method, "headline"
            )
    for seed in plan.seeds:
        for method in plan.headline_methods:
            add(
                FederationSetup(h.missingness, h.rate, h.alpha, h.clients, seed), method, "headline"
            )
        for alpha in plan.alphas:
            for mode in plan.missingness:
                for rate in plan.rates:
                    setup = FederationSetup(mode, rate, alpha, plan.clients, seed)
                    for method in plan.sweep_methods:
                        add(setup, method, "sweep")
    return jobs


def experiment_name(setup: FederationSetup) -> str:
    return (
        f"quality-{setup.missingness}-rate{setup.rate:g}-alpha{setup.alpha:g}-"
        f"clients{setup.clients}-seed{setup.seed}"
    )


def experiment_of(setup: FederationSetup, methods: list[str], grid: GridSettings) -> dict[str, Any]:
    """The experiment file (as a mapping) that runs ``methods`` on ``setup``."""
    execution: dict[str, Any] = {
        "backend": grid.backend,
        "concurrent_runs": grid.concurrent_runs,
    }
    if grid.ray_address is not None:
        execution["address"] = grid.ray_address
    return {
        "name": experiment_name(setup),
        "data": {
            "kind": "embeddings",
            "path": str(grid.embeddings),
            "test_fraction": grid.test_fraction,
        },
        "federation": {
            "clients": setup.clients,
            "dirichlet_alpha": setup.alpha,
            "missing": {"mode": setup.missingness, "rate": setup.rate},
            "min_samples_per_client": setup.min_samples,
        },
        "rounds": {"rounds": grid.rounds},
        "train": {
            "local_epochs": grid.local_epochs,
            "batch_size": grid.batch_size,
            "lr": grid.lr,
            "modality_dropout": grid.modality_dropout,
            "central_epochs": grid.central_epochs,
        },
        "model": {"hidden_dim": grid.hidden_dim},
        "methods": methods,
        "seeds": [setup.seed],
        "execution": execution,
    }


def write_experiment_files(
    jobs: Iterable[Job], grid: GridSettings, out_dir: Path
) -> list[tuple[Path, list[Job]]]:
    """One experiment file per federation setup (in the jobs' priority order), holding the
    setup's methods; returns each file with the jobs it covers."""
    groups: dict[FederationSetup, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.setup, []).append(job)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for setup, members in groups.items():
        doc = experiment_of(setup, [j.method for j in members], grid)
        path = out_dir / f"{doc['name']}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        files.append((path, members))
    return files


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a (possibly interrupted) sweep; a torn last line is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def record_key(record: dict[str, Any]) -> str:
    s = record["setup"]
    return (
        f"{record['method']}|{s['missingness']}|{s['rate']:g}|{s['alpha']:g}|{s['clients']}|"
        f"{s['seed']}"
    )


def record_of(job: Job, run: RunRecord, fed: SeedFederation) -> dict[str, Any]:
    """One line of the records file (the report's input)."""
    setup = asdict(job.setup)
    setup.pop("min_samples")
    return {
        "setup": setup,
        "method": job.method,
        "group": job.group,
        "scores": run.scores,
        "client_modalities": fed.client_modalities,
        "client_sizes": fed.client_sizes,
        "seconds": run.seconds,
    }


def run_jobs(
    jobs: Iterable[Job],
    records_path: Path,
    grid: GridSettings,
    experiments_dir: Path,
    deadline_s: float | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run the jobs not already in `records_path`, experiment file by experiment file, on one
    executor (a Ray instance shared by the whole grid); stop starting experiments at
    `deadline_s` (wall clock from start) and return every record on file."""
    from crossfed.simulation.experiment import load_experiment
    from crossfed.simulation.experiment_run import open_executor, run_experiment
    from crossfed.simulation.federation_data import load_data

    done = {record_key(r) for r in read_records(records_path)}
    todo = [j for j in jobs if j.key() not in done]
    records_path.parent.mkdir(parents=True, exist_ok=True)
    if not todo:
        return read_records(records_path)
    start = time.perf_counter()
    files = write_experiment_files(todo, grid, experiments_dir)
    first = ExperimentConfig.model_validate(experiment_of(todo[0].setup, ["ours"], grid))
    data: LoadedData = load_data(first.data)
    executor = open_executor(first)
    try:
        with records_path.open("a") as sink:
            for path, members in files:
                if deadline_s is not None and time.perf_counter() - start > deadline_s:
                    break
                by_method = {j.method: j for j in members}

                def keep(
                    run: RunRecord, fed: SeedFederation, by_method: dict[str, Job] = by_method
                ) -> None:
                    record = record_of(by_method[run.method], run, fed)
                    sink.write(json.dumps(record, allow_nan=True) + "\n")
                    sink.flush()

                run_experiment(load_experiment(path), executor, data, progress, on_run=keep)
    finally:
        executor.close()
    return read_records(records_path)
