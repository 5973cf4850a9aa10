"""The grid of runs: jobs (one method on one federation setup), their deduplication, and a
pool of worker processes (one torch thread each) that runs them with a rich progress bar,
appending each finished record to a JSON-lines file so an interrupted sweep keeps its work."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from crossfed.common.data.progress_display import make_progress

from quality.federated_simulation import TrainingBudget
from quality.quality_data import FederationSetup, Missingness


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


# -- worker side ------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(
    embeddings: str, test_fraction: float, hidden_dim: int, budget: dict[str, Any]
) -> None:
    import torch
    from crossfed.common.data.embeddings import EmbeddingSet

    torch.set_num_threads(1)
    _WORKER.update(
        data=EmbeddingSet.load(embeddings),
        test_fraction=test_fraction,
        hidden_dim=hidden_dim,
        budget=TrainingBudget(**budget),
        federations={},
    )


def run_job(job: Job) -> dict[str, Any]:
    """Worker entry point: build (or reuse) the federation, run the method, score it."""
    from crossfed.common.model.model_config import ModelConfig

    from quality.methods import CENTRAL_METHODS, run_central_method, run_federated_method
    from quality.quality_data import build_federation

    start = time.perf_counter()
    data = _WORKER["data"]
    feds: dict[FederationSetup, Any] = _WORKER["federations"]
    if job.setup not in feds:
        feds.clear()  # one setup at a time per worker keeps memory flat
        feds[job.setup] = build_federation(data, job.setup, _WORKER["test_fraction"])
    fed = feds[job.setup]
    base = ModelConfig(
        text_dim=data.text_dim,
        image_dim=data.image_dim,
        num_classes=int(data.labels.max()) + 1,
        hidden_dim=_WORKER["hidden_dim"],
    )
    runner = run_central_method if job.method in CENTRAL_METHODS else run_federated_method
    scores = runner(job.method, base, fed, _WORKER["budget"], job.setup.seed)
    return {
        "setup": asdict(job.setup),
        "method": job.method,
        "group": job.group,
        "scores": scores,
        "client_modalities": fed.client_modalities,
        "client_sizes": [len(s) for s in fed.shards],
        "seconds": time.perf_counter() - start,
    }


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


def run_jobs(
    jobs: Iterable[Job],
    records_path: Path,
    embeddings: Path,
    test_fraction: float,
    hidden_dim: int,
    budget: TrainingBudget,
    workers: int,
    deadline_s: float | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run the jobs not already in `records_path` in `workers` processes; stop submitting
    at `deadline_s` (wall clock from start) and return every record on file."""
    done = {record_key(r) for r in read_records(records_path)}
    todo = [j for j in jobs if j.key() not in done]
    records_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    workers = max(1, min(workers, len(todo) or 1, os.cpu_count() or 1))
    with (
        make_progress(progress) as bar,
        ProcessPoolExecutor(
            workers,
            initializer=_init_worker,
            initargs=(str(embeddings), test_fraction, hidden_dim, asdict(budget)),
        ) as pool,
        records_path.open("a") as sink,
    ):
        task = bar.add_task("quality sweep", total=len(todo))
        queue = list(todo)
        running: dict[Future[dict[str, Any]], Job] = {}
        while queue or running:
            late = deadline_s is not None and time.perf_counter() - start > deadline_s
            while queue and len(running) < workers and not late:
                job = queue.pop(0)
                running[pool.submit(run_job, job)] = job
            if not running:
                break
            finished, _ = wait(running, timeout=5.0, return_when=FIRST_COMPLETED)
            for fut in finished:
                running.pop(fut)
                sink.write(json.dumps(fut.result()) + "\n")
                sink.flush()
                bar.advance(task)
            overdue = deadline_s is not None and time.perf_counter() - start > deadline_s * 1.15
            if late and not finished and overdue:
                for fut in running:
                    fut.cancel()
                break
    return read_records(records_path)
