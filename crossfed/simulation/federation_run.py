"""One federated run: a method, a seed, rounds of sampled virtual clients.

Per round the global shareable weights go to the sampled clients, each runs `train_local`
from them with its own VLMR memory (seeded by the last global prototypes when the method
exchanges projections), and their updates are folded in client order by the aggregation
strategy (server/aggregation.py's module-aware FedAvg, eq. 15) while their projections go
through the server's `ProjectionAggregator` (eq. 16). After the last round, a method that
calibrates runs the server's CCVR step on every image-holding client's statistics
(server/calibration_round.py). The global model is scored per Table I configuration.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from crossfed.client.local_trainer import TrainConfig
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.evaluation import evaluate
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.model_construction import model_to_load, seeded_model
from crossfed.common.model.network import CrossModalNet
from crossfed.common.model.prototypes import ClassPrototypes, apply_global_prototypes
from crossfed.server.calibration_round import StatsSum, ccvr_calibration_step
from crossfed.server.errors import InvalidUpdateError
from crossfed.server.projection_exchange import ProjectionAggregator, ProjectionSpec
from crossfed.server.strategies.base import RoundInstructions
from crossfed.simulation.byzantine import NO_ATTACK, Attack
from crossfed.simulation.client_executor import ClientExecutor, DataRef
from crossfed.simulation.experiment import RoundsSection
from crossfed.simulation.simulation_errors import SimulationError
from crossfed.simulation.strategy import AggregationStrategy
from crossfed.simulation.virtual_client import (
    ClientTask,
    Scores,
    arrays_of,
    tensors_of,
)


@dataclass(frozen=True)
class RunPlan:
    """What one federated run needs besides the executor and the data handles."""

    method: str
    seed: int
    model: ModelConfig
    rounds: RoundsSection
    local_epochs: int
    batch_size: int
    lr: float
    modality_dropout: float
    exchange_projections: bool
    calibration_noise: float
    threads_per_client: int
    #: benchmarks/tests only: what the clients in ``attackers`` do to their updates
    attack: Attack = NO_ATTACK
    attackers: frozenset[int] = frozenset()


@dataclass
class RoundRecord:
    """One round: who was sampled, who reported, how long it took, and the global model's
    scores per Table I configuration when it was evaluated."""

    round: int
    sampled: int
    reported: int
    failed: list[int]
    seconds: float
    scores: Scores | None
    client_seconds_max: float
    #: highest peak RSS of a worker that ran a client this round (shared object-store pages
    #: it touched included), and its own (anonymous) resident memory
    worker_peak_rss_mib: float
    worker_private_mib: float
    #: what every client that has trained so far keeps between rounds (its VLMR memory)
    client_state_mib: float


@dataclass
class RunRecord:
    """A finished run: per-round records, the final scores (after calibration)."""

    method: str
    seed: int
    rounds: list[RoundRecord]
    scores: Scores
    seconds: float
    calibration: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class FederationOutcome:
    """A run's record and the global model it ended with (weights and prototypes)."""

    record: RunRecord
    state: dict[str, torch.Tensor]
    prototypes: ClassPrototypes | None


def sample_clients(num_clients: int, fraction: float, seed: int, round_no: int) -> list[int]:
    """The clients of a round, in client order: all of them at fraction 1, else a seeded
    draw of round(fraction * N) (at least one) without replacement."""
    if fraction >= 1.0:
        return list(range(num_clients))
    k = max(1, round(fraction * num_clients))
    rng = np.random.default_rng([seed, round_no])
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


def client_seed(seed: int, round_no: int, client: int) -> int:
    """Local training seed of a client in a round (independent of where it runs)."""
    return seed * 100_003 + round_no * 1_009 + client


def initial_global_state(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """The seeded initial global model (what `crossfed server` starts from)."""
    return seeded_model(config, seed).shareable_state_dict()


def global_model(
    config: ModelConfig, state: dict[str, torch.Tensor], prototypes: ClassPrototypes | None
) -> CrossModalNet:
    """The global model as clients and `crossfed evaluate` see it: weights, an empty memory,
    the global prototypes (eq. 16) as retrieval entries."""
    model = model_to_load(config)
    model.load_shareable_state_dict(state)
    if prototypes is not None:
        apply_global_prototypes(model, prototypes)
    model.eval()
    return model


def _check_plan(plan: RunPlan, num_clients: int) -> None:
    sampled = len(sample_clients(num_clients, plan.rounds.fraction, plan.seed, 0))
    if sampled < plan.rounds.min_clients:
        raise SimulationError(
            f"{plan.method}: {sampled} of {num_clients} clients are sampled per round "
            f"(fraction {plan.rounds.fraction:g}), fewer than min_clients "
            f"{plan.rounds.min_clients}"
        )


def local_train_config(
    plan: RunPlan, round_no: int, client: int, instructions: RoundInstructions
) -> TrainConfig:
    """A client's local training settings in a round, with what the strategy asks of it."""
    return TrainConfig(
        epochs=plan.local_epochs,
        batch_size=plan.batch_size,
        lr=plan.lr,
        seed=client_seed(plan.seed, round_no, client),
        modality_dropout=plan.modality_dropout,
        num_threads=plan.threads_per_client,
        proximal_mu=instructions.proximal_mu,
        logit_adjustment=instructions.logit_adjustment,
    )


def run_federation(
    plan: RunPlan,
    executor: ClientExecutor,
    shards: Sequence[DataRef],
    test: EmbeddingSet,
    strategy: AggregationStrategy,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> FederationOutcome:
    """Run ``plan.rounds.rounds`` rounds over ``shards``; ``test`` is the EmbeddingSet the
    global model is scored on (in this process)."""
    _check_plan(plan, len(shards))
    started = time.perf_counter()
    cfg, policy = plan.model, plan.rounds
    config_json = cfg.model_dump_json()
    state = initial_global_state(cfg, plan.seed)
    spec = ProjectionSpec(cfg.num_classes, cfg.text_dim, cfg.image_dim)
    prototypes: ClassPrototypes | None = None
    memories: dict[int, DataRef] = {}
    memory_kib: dict[int, float] = {}
    records: list[RoundRecord] = []
    for rnd in range(policy.rounds):
        round_start = time.perf_counter()
        clients = sample_clients(len(shards), policy.fraction, plan.seed, rnd)
        strategy.begin_round(state, rnd)
        instructions = strategy.instructions
        tasks = [
            ClientTask(
                client=c,
                round_no=rnd,
                train=local_train_config(plan, rnd, c, instructions),
                share_projections=plan.exchange_projections,
                attack=plan.attack if c in plan.attackers else NO_ATTACK,
            )
            for c in clients
        ]
        projections = ProjectionAggregator(spec)
        failed: list[int] = []
        reported = 0
        slowest = peak = private = 0.0
        proto_arrays = None if prototypes is None else arrays_of(prototypes.to_tensors())
        outcomes = executor.run_round(
            config_json, tasks, arrays_of(state), shards, memories, proto_arrays
        )
        for outcome in outcomes:
            update = outcome.update
            if update is None:
                if policy.on_client_failure == "fail":
                    raise SimulationError(
                        f"{plan.method} seed {plan.seed} round {rnd + 1}: client "
                        f"{outcome.client} failed ({outcome.error}) and "
                        "rounds.on_client_failure is 'fail'"
                    )
                failed.append(outcome.client)
                continue
            try:
                weights = strategy.weights_of(update.num_samples, update.module_samples)
            except InvalidUpdateError as exc:
                raise SimulationError(f"client {update.client}: {exc}") from exc
            strategy.add(
                tensors_of(update.state), weights, update.num_samples, f"client-{update.client}"
            )
            if update.projections is not None:
                projections.add(
                    f"client-{update.client}",
                    rnd,
                    {k: v.double() for k, v in tensors_of(update.projections).items()},
                )
            reported += 1
            memory_kib[update.client] = update.metrics.get("memory_kib", 0.0)
            slowest = max(slowest, update.metrics.get("train_seconds", 0.0))
            peak = max(peak, update.metrics.get("peak_rss_mib", 0.0))
            private = max(private, update.metrics.get("private_rss_mib", 0.0))
        if reported < policy.min_clients:
            raise SimulationError(
                f"{plan.method} seed {plan.seed} round {rnd + 1}: {reported} of {len(clients)} "
                f"clients reported, min_clients is {policy.min_clients} (failed: {failed[:10]})"
            )
        state = strategy.result()
        if plan.exchange_projections:
            prototypes = ClassPrototypes.from_tensors(projections.sums())
        last = rnd + 1 == policy.rounds
        scores = None
        if last or (rnd + 1) % policy.eval_every == 0:
            scores = evaluate(global_model(cfg, state, prototypes), test)
        record = RoundRecord(
            round=rnd + 1,
            sampled=len(clients),
            reported=reported,
            failed=failed,
            seconds=time.perf_counter() - round_start,
            scores=scores,
            client_seconds_max=slowest,
            worker_peak_rss_mib=peak,
            worker_private_mib=private,
            client_state_mib=sum(memory_kib.values()) / 1024,
        )
        records.append(record)
        if on_round is not None:
            on_round(record)
    calibration = None
    if cfg.calibration_paths() and cfg.missing_fill != "zero":
        state, calibration = _calibrate(plan, executor, shards, state, prototypes)
    final = records[-1].scores
    if calibration is not None or final is None:
        final = evaluate(global_model(cfg, state, prototypes), test)
    run = RunRecord(
        method=plan.method,
        seed=plan.seed,
        rounds=records,
        scores=final,
        seconds=time.perf_counter() - started,
        calibration=calibration,
    )
    return FederationOutcome(run, state, prototypes)


def _calibrate(
    plan: RunPlan,
    executor: ClientExecutor,
    shards: Sequence[DataRef],
    state: dict[str, torch.Tensor],
    prototypes: ClassPrototypes | None,
) -> tuple[dict[str, torch.Tensor], str]:
    """The calibration round: every client's statistics under the final model (served with
    the global prototypes, as it is scored),
    summed and fitted by the server's CCVR step; the state stays as it was when the fit
    declines (too noisy, too few classes)."""
    step = ccvr_calibration_step(plan.model, seed=plan.seed)
    total = StatsSum(step.spec)
    seeds = [plan.seed * 100_003 + 7 + c for c in range(len(shards))]
    protos = None if prototypes is None else arrays_of(prototypes.to_tensors())
    stats = executor.calibration_stats(
        plan.model.model_dump_json(),
        arrays_of(state),
        shards,
        plan.calibration_noise,
        seeds,
        protos,
    )
    for part in stats:
        if part is not None:
            total.add(tensors_of(part))
    if total.contributors == 0:
        return state, "no client holds rows of a calibrated path; left uncalibrated"
    fitted, message = step.fit(state, total.result())
    return (state if fitted is None else fitted), message
