"""An experiment end to end: the data encoded once, one federation per seed (shards put into
the executor once), every federated method run round by round (several at a time when
``execution.concurrent_runs`` > 1), central references trained beside them, all scored per
Table I configuration."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Self

import torch

from crossfed.client.local_trainer import TrainConfig
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.data.progress_display import make_progress
from crossfed.common.model.evaluation import CONFIGURATIONS
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet
from crossfed.simulation.byzantine import Attack, attacker_clients
from crossfed.simulation.client_executor import ClientExecutor, DataRef, InlineExecutor, Pending
from crossfed.simulation.experiment import ExperimentConfig
from crossfed.simulation.federation_data import (
    FederatedData,
    FederationSetup,
    LoadedData,
    build_federation,
    load_data,
    only_modality,
    shards_with,
)
from crossfed.simulation.federation_run import RoundRecord, RunPlan, RunRecord, run_federation
from crossfed.simulation.methods import CENTRAL_METHODS, FEDERATED_METHODS, zero_fill
from crossfed.simulation.simulation_errors import SimulationError
from crossfed.simulation.strategy import make_strategy
from crossfed.simulation.virtual_client import Scores, shard_arrays


@dataclass(frozen=True)
class SeedFederation:
    """How one seed's federation came out (always stated with results)."""

    setup: FederationSetup
    client_sizes: list[int]
    client_modalities: list[str]


@dataclass
class ExperimentResult:
    """Every run of an experiment, its federations and where it ran."""

    config: ExperimentConfig
    class_names: tuple[str, ...]
    runs: list[RunRecord]
    federations: dict[int, SeedFederation]
    execution: dict[str, Any]
    wall_seconds: float
    data_seconds: float


@dataclass
class _SeedData:
    """One seed's federation as the executor holds it: the shards of each client set the
    methods train on (all clients, or those holding one modality), the central references
    under way, and the test split the driver scores global models on."""

    test: EmbeddingSet
    refs: dict[str, list[DataRef]] = field(default_factory=dict)
    central: dict[str, Pending | None] = field(default_factory=dict)


def open_executor(cfg: ExperimentConfig) -> ClientExecutor:
    """The backend the experiment asks for (Ray is imported only here)."""
    retries = cfg.rounds.client_retries
    if cfg.execution.backend == "inline":
        return InlineExecutor(retries)
    from crossfed.simulation.ray_executor import RayExecutor

    return RayExecutor(cfg.execution, retries)


def describe_executor(executor: ClientExecutor) -> dict[str, Any]:
    """Backend, nodes, CPUs and client slots, for the results."""
    return {
        "backend": "inline" if isinstance(executor, InlineExecutor) else "ray",
        "slots": executor.slots,
        "nodes": getattr(executor, "nodes", 1),
        "cluster_cpus": getattr(executor, "cluster_cpus", 1.0),
    }


def nan_scores() -> Scores:
    """Scores of a method that had nothing to train on."""
    return {c: {"accuracy": math.nan, "macro_f1": math.nan, "count": 0.0} for c in CONFIGURATIONS}


def base_model(cfg: ExperimentConfig, data: EmbeddingSet, num_classes: int) -> ModelConfig:
    """The experiment's network for this data."""
    return cfg.model_config_for(data.text_dim, data.image_dim, num_classes)


def run_plan(
    cfg: ExperimentConfig, method: str, seed: int, base: ModelConfig, threads: int
) -> RunPlan:
    """A federated method's run: its model config, dropout and exchange (methods.py)."""
    recipe = FEDERATED_METHODS[method]
    dropout = {"none": 0.0, "ours": cfg.train.ours_dropout, "baseline": cfg.train.modality_dropout}
    return RunPlan(
        method=method,
        seed=seed,
        model=recipe.config_update(base),
        rounds=cfg.rounds,
        local_epochs=cfg.train.local_epochs,
        batch_size=cfg.train.batch_size,
        lr=cfg.train.lr,
        modality_dropout=dropout[recipe.dropout],
        exchange_projections=recipe.exchange,
        calibration_noise=recipe.calibration_noise,
        threads_per_client=threads,
        attack=Attack(cfg.attack.kind, cfg.attack.factor),
        attackers=attacker_clients(cfg.federation.clients, cfg.attack.clients, seed),
    )


def _central_train_set(name: str, fed: FederatedData) -> EmbeddingSet:
    if name == "central_paired":
        return fed.full_train
    return only_modality(fed.train, "text" if name == "ceiling_text" else "image")


class _Progress:
    """A rich bar per running run plus one for the whole experiment (thread-safe)."""

    def __init__(self, enabled: bool, total_rounds: int) -> None:
        self._bar = make_progress(enabled)
        self._lock = threading.Lock()
        self._total = self._bar.add_task("experiment (rounds)", total=total_rounds)

    def __enter__(self) -> Self:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(None, None, None)

    def track(self, label: str, rounds: int) -> Callable[[RoundRecord], None]:
        with self._lock:
            task = self._bar.add_task(label, total=rounds)

        def on_round(record: RoundRecord) -> None:
            note = ""
            if record.scores is not None:
                acc = {c: record.scores[c]["accuracy"] for c in CONFIGURATIONS}
                note = " ".join(f"{c[0]}={v:.3f}" for c, v in acc.items() if math.isfinite(v))
            with self._lock:
                self._bar.update(task, advance=1, description=f"{label} {note}".strip())
                self._bar.advance(self._total)
                if record.round == rounds:
                    self._bar.remove_task(task)

        return on_round


def run_experiment(
    cfg: ExperimentConfig,
    executor: ClientExecutor | None = None,
    data: LoadedData | None = None,
    progress: bool = True,
    on_run: Callable[[RunRecord, SeedFederation], None] | None = None,
) -> ExperimentResult:
    """Run every (method, seed) of ``cfg``; ``executor`` and ``data`` may be shared between
    experiments (the quality benchmark's grid), otherwise they are opened here. ``on_run``
    sees each finished run with its seed's federation, as soon as it finishes."""
    started = time.perf_counter()
    loaded = data if data is not None else load_data(cfg.data, progress)
    data_seconds = time.perf_counter() - started
    own = executor is None
    backend = open_executor(cfg) if executor is None else executor
    threads = torch.get_num_threads()
    try:
        if backend.slots > 1:
            # the driver only folds updates and scores the global model while the workers
            # hold the cores: intra-op threads here would fight them (measured on 2 cores,
            # 1,000 clients: folding 100 updates took 2.5 s with 2 threads, 0.08 s with 1)
            torch.set_num_threads(1)
        runs, federations = _run_all(cfg, backend, loaded, progress, on_run)
        return ExperimentResult(
            config=cfg,
            class_names=loaded.class_names,
            runs=runs,
            federations=federations,
            execution=describe_executor(backend),
            wall_seconds=time.perf_counter() - started,
            data_seconds=data_seconds,
        )
    finally:
        torch.set_num_threads(threads)
        if own:
            backend.close()


def _prepare_seed(
    cfg: ExperimentConfig,
    executor: ClientExecutor,
    emb: EmbeddingSet,
    seed: int,
    base: ModelConfig,
    threads: int,
) -> tuple[_SeedData, SeedFederation]:
    """Build a seed's federation, put every client set its methods need into the executor
    (once for the whole experiment) and start its central references; the driver keeps only
    the test split."""
    fed = build_federation(emb, FederationSetup.of(cfg, seed), cfg.data.test_fraction)
    sd = _SeedData(fed.test)
    for name in cfg.methods:
        recipe = FEDERATED_METHODS.get(name)
        if recipe is None:
            continue
        key = recipe.only or "all"
        if key not in sd.refs:
            shards = fed.shards if recipe.only is None else shards_with(fed.shards, recipe.only)
            sd.refs[key] = [executor.put(shard_arrays(s)) for s in shards]
    test_ref = None
    for name in cfg.methods:
        if name not in CENTRAL_METHODS:
            continue
        train = _central_train_set(name, fed)
        if len(train) == 0:
            sd.central[name] = None
            continue
        test_ref = executor.put(shard_arrays(fed.test)) if test_ref is None else test_ref
        train_cfg = TrainConfig(
            epochs=cfg.train.central_epochs,
            batch_size=cfg.train.batch_size,
            lr=cfg.train.lr,
            seed=seed,
            num_threads=threads,
        )
        sd.central[name] = executor.central(
            zero_fill(base).model_dump_json(),
            executor.put(shard_arrays(train)),
            test_ref,
            train_cfg,
            seed,
        )
    federation = SeedFederation(
        FederationSetup.of(cfg, seed), [len(s) for s in fed.shards], list(fed.client_modalities)
    )
    return sd, federation


def _run_all(
    cfg: ExperimentConfig,
    executor: ClientExecutor,
    loaded: LoadedData,
    progress: bool,
    on_run: Callable[[RunRecord, SeedFederation], None] | None,
) -> tuple[list[RunRecord], dict[int, SeedFederation]]:
    emb = loaded.embeddings
    num_classes = max(len(loaded.class_names), int(emb.labels.max()) + 1 if len(emb) else 2)
    base = base_model(cfg, emb, num_classes)
    threads = max(1, int(cfg.execution.cpus_per_client))
    seeds: dict[int, _SeedData] = {}
    federations: dict[int, SeedFederation] = {}
    for seed in cfg.seeds:
        seeds[seed], federations[seed] = _prepare_seed(cfg, executor, emb, seed, base, threads)
    records: list[RunRecord] = []
    lock = threading.Lock()

    def finished(record: RunRecord) -> None:
        with lock:
            records.append(record)
            if on_run is not None:
                on_run(record, federations[record.seed])

    def run_one(seed: int, method: str, on_round: Callable[[RoundRecord], None]) -> None:
        sd = seeds[seed]
        refs = sd.refs[FEDERATED_METHODS[method].only or "all"]
        if not refs:  # no client holds the modality (per-client missingness, high rate)
            finished(RunRecord(method, seed, [], nan_scores(), 0.0, None, ["no clients"]))
            return
        outcome = run_federation(
            run_plan(cfg, method, seed, base, threads),
            executor,
            refs,
            sd.test,
            make_strategy(cfg.strategy.name, CrossModalNet.module_of, cfg.strategy.params),
            on_round,
        )
        finished(outcome.record)

    jobs = [(seed, m) for seed in cfg.seeds for m in cfg.methods if m in FEDERATED_METHODS]
    concurrent = cfg.execution.concurrent_runs if executor.slots > 1 else 1
    with (
        _Progress(progress, len(jobs) * cfg.rounds.rounds) as bars,
        ThreadPoolExecutor(concurrent, "crossfed-run") as pool,
    ):
        futures = [
            pool.submit(run_one, seed, m, bars.track(f"{m} seed {seed}", cfg.rounds.rounds))
            for seed, m in jobs
        ]
        for fut in as_completed(futures):
            error = fut.exception()
            if error is not None:  # the first failed run stops the ones not started yet
                for other in futures:
                    other.cancel()
                raise error
    for seed, sd in seeds.items():
        for name, job in sd.central.items():
            scores, seconds = (nan_scores(), 0.0) if job is None else job.result()
            finished(RunRecord(name, seed, [], scores, seconds))
    order = {m: i for i, m in enumerate(cfg.methods)}
    records.sort(key=lambda r: (order[r.method], cfg.seeds.index(r.seed)))
    if not records:
        raise SimulationError("the experiment ran nothing")
    return records, federations
