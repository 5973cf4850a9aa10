"""The grid of runs: jobs (one method on one federation setup), their deduplication, and their
grouping into experiment files (one per federation setup) that the simulator runs
(`crossfed.simulation.experiment_run.run_experiment`, the code behind `crossfed simulate`) on
one shared Ray instance, appending each finished run to a JSON-lines file so an interrupted
sweep keeps its work."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from crossfed.simulation.byzantine import AttackKind
from crossfed.simulation.experiment import ExperimentConfig
from crossfed.simulation.experiment_run import SeedFederation
from crossfed.simulation.federation_data import FederationSetup, LoadedData, Missingness
from crossfed.simulation.federation_run import RunRecord


@dataclass(frozen=True)
class RunVariant:
    """How a run departs from the grid's shared settings (the strategy, attack and budget
    axes); the default departs in nothing, and its runs keep the grid's record keys."""

    strategy: str = "fedavg"
    strategy_params: tuple[tuple[str, float], ...] = ()
    proximal_mu: float = 0.0
    attack: AttackKind = "none"
    attackers: int = 0
    rounds: int | None = None
    local_epochs: int | None = None
    lr: float | None = None

    def tag(self) -> str:
        """A short stable name ("" for the default)."""
        parts = []
        if self.strategy != "fedavg" or self.strategy_params:
            params = ",".join(f"{k}={v:g}" for k, v in self.strategy_params)
            parts.append(self.strategy + (f"[{params}]" if params else ""))
        if self.proximal_mu:
            parts.append(f"mu{self.proximal_mu:g}")
        if self.attack != "none":
            parts.append(f"{self.attack}x{self.attackers}")
        for name, value in (("r", self.rounds), ("e", self.local_epochs), ("lr", self.lr)):
            if value is not None:
                parts.append(f"{name}{value:g}")
        return "+".join(parts)

    def params(self) -> dict[str, float]:
        """The strategy's parameters (FedProx's mu is one)."""
        mu = {"proximal_mu": self.proximal_mu} if self.proximal_mu else {}
        return {**dict(self.strategy_params), **mu}

    @classmethod
    def of(cls, record: dict[str, Any]) -> RunVariant:
        """The variant a record was run with (none stated: the default)."""
        raw = dict(record.get("variant") or {})
        raw["strategy_params"] = tuple(tuple(p) for p in raw.get("strategy_params", ()))
        return cls(**raw)


DEFAULT_VARIANT = RunVariant()


@dataclass(frozen=True)
class Job:
    """One method trained and evaluated on one setup; `group` says which table it feeds."""

    setup: FederationSetup
    method: str
    group: str  # "headline", "sweep", or an axis suite's own
    variant: RunVariant = DEFAULT_VARIANT

    def key(self) -> str:
        s = self.setup
        key = f"{self.method}|{s.missingness}|{s.rate:g}|{s.alpha:g}|{s.clients}|{s.seed}"
        tag = self.variant.tag()
        return f"{key}|{tag}" if tag else key


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
    #: the dataset's name in the records (the embeddings file holds it)
    dataset: str = "builtin"
    num_cpus: int | None = None
    #: score the global model every N rounds (None: every round; the records keep the last)
    eval_every: int | None = None


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


def experiment_name(setup: FederationSetup, variant: RunVariant = DEFAULT_VARIANT) -> str:
    name = (
        f"quality-{setup.missingness}-rate{setup.rate:g}-alpha{setup.alpha:g}-"
        f"clients{setup.clients}-seed{setup.seed}"
    )
    tag = variant.tag()
    if tag:  # experiment names allow [A-Za-z0-9_.-], 64 characters
        name += "-" + hashlib.sha256(tag.encode()).hexdigest()[:10]
    return name


def experiment_of(
    setup: FederationSetup,
    methods: list[str],
    grid: GridSettings,
    variant: RunVariant = DEFAULT_VARIANT,
) -> dict[str, Any]:
    """The experiment file (as a mapping) that runs ``methods`` on ``setup``."""
    execution: dict[str, Any] = {
        "backend": grid.backend,
        "concurrent_runs": grid.concurrent_runs,
    }
    if grid.ray_address is not None:
        execution["address"] = grid.ray_address
    if grid.num_cpus is not None and grid.ray_address is None:
        execution["num_cpus"] = grid.num_cpus
    doc: dict[str, Any] = {
        "name": experiment_name(setup, variant),
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
        "rounds": {
            "rounds": variant.rounds or grid.rounds,
            **({"eval_every": grid.eval_every} if grid.eval_every else {}),
        },
        "train": {
            "local_epochs": variant.local_epochs or grid.local_epochs,
            "batch_size": grid.batch_size,
            "lr": variant.lr or grid.lr,
            "modality_dropout": grid.modality_dropout,
            "central_epochs": grid.central_epochs,
        },
        "model": {"hidden_dim": grid.hidden_dim},
        "strategy": {"name": variant.strategy, "params": variant.params()},
        "methods": methods,
        "seeds": [setup.seed],
        "execution": execution,
    }
    if variant.attack != "none":
        doc["attack"] = {"kind": variant.attack, "clients": variant.attackers}
    return doc


def write_experiment_files(
    jobs: Iterable[Job], grid: GridSettings, out_dir: Path
) -> list[tuple[Path, list[Job]]]:
    """One experiment file per federation setup and variant (in the jobs' priority order),
    holding its methods; returns each file with the jobs it covers."""
    groups: dict[tuple[FederationSetup, RunVariant], list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.setup, job.variant), []).append(job)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for (setup, variant), members in groups.items():
        doc = experiment_of(setup, [j.method for j in members], grid, variant)
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
    key = (
        f"{record['method']}|{s['missingness']}|{s['rate']:g}|{s['alpha']:g}|{s['clients']}|"
        f"{s['seed']}"
    )
    tag = RunVariant.of(record).tag()
    return f"{key}|{tag}" if tag else key


def record_of(
    job: Job, run: RunRecord, fed: SeedFederation, dataset: str = "builtin"
) -> dict[str, Any]:
    """One line of the records file (the report's input)."""
    setup = asdict(job.setup)
    setup.pop("min_samples")
    record: dict[str, Any] = {
        "setup": setup,
        "method": job.method,
        "group": job.group,
        "scores": run.scores,
        "client_modalities": fed.client_modalities,
        "client_sizes": fed.client_sizes,
        "seconds": run.seconds,
    }
    if job.variant != DEFAULT_VARIANT:
        record["variant"] = asdict(job.variant)
    if dataset != "builtin":
        record["dataset"] = dataset
    return record


def run_jobs(
    jobs: Iterable[Job],
    records_path: Path,
    grid: GridSettings,
    experiments_dir: Path,
    deadline_s: float | None = None,
    progress: bool = True,
    parallel_files: int = 1,
) -> list[dict[str, Any]]:
    """Run the jobs not already in `records_path`, experiment file by experiment file (up to
    ``parallel_files`` at once: an axis sweep's files hold one run each), on one executor (a
    Ray instance shared by the whole grid); stop starting experiments at `deadline_s` (wall
    clock from start) and return every record on file."""
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
    lock = threading.Lock()
    try:
        with records_path.open("a") as sink:

            def run_file(path: Path, members: list[Job]) -> None:
                if deadline_s is not None and time.perf_counter() - start > deadline_s:
                    return
                by_method = {j.method: j for j in members}

                def keep(run: RunRecord, fed: SeedFederation) -> None:
                    record = record_of(by_method[run.method], run, fed, grid.dataset)
                    with lock:
                        sink.write(json.dumps(record, allow_nan=True) + "\n")
                        sink.flush()

                run_experiment(load_experiment(path), executor, data, progress, on_run=keep)

            if parallel_files <= 1:
                for path, members in files:
                    run_file(path, members)
            else:
                with ThreadPoolExecutor(parallel_files, "quality-file") as pool:
                    for fut in [pool.submit(run_file, p, m) for p, m in files]:
                        fut.result()
    finally:
        executor.close()
    return read_records(records_path)
