"""A simulated run is the federation the daemons would run: each sampled client trains with
the real `train_local` from the global weights and its own VLMR memory, the server's
module-aware `StreamingFedAvg` folds the updates and `ProjectionAggregator` the projections.
Checked bit for bit against that loop written out by hand; plus client sampling, the
memory each client keeps, calibration through the server's CCVR step, and the round policy
when a client fails (inline executor: no Ray needed)."""

from __future__ import annotations

import math

import pytest
import torch
from crossfed.client.local_trainer import TrainConfig, train_local
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet
from crossfed.common.model.prototypes import ClassPrototypes, compute_class_projections
from crossfed.server.aggregation import StreamingFedAvg, module_weights_of
from crossfed.server.projection_exchange import ProjectionAggregator, ProjectionSpec

from crossfed.simulation.client_executor import InlineExecutor
from crossfed.simulation.experiment import RoundsSection
from crossfed.simulation.federation_data import FederatedData, FederationSetup, build_federation
from crossfed.simulation.federation_run import (
    FederationOutcome,
    RunPlan,
    client_seed,
    run_federation,
    sample_clients,
)
from crossfed.simulation.simulation_errors import SimulationError
from crossfed.simulation.strategy import make_strategy
from crossfed.simulation.virtual_client import Arrays, pack_memory, shard_arrays, unpack_memory
from tests.support.simulation_data import clustered_embeddings

# tau 0.3: clients admit pairs into their VLMR memory from the first round, so the memory a
# client keeps between rounds shapes its next update
CONFIG = ModelConfig(
    text_dim=16, image_dim=8, num_classes=4, hidden_dim=16, memory_tau=0.3, memory_capacity=64
)


def _plan(**kw: object) -> RunPlan:
    base = {
        "method": "ours",
        "seed": 3,
        "model": CONFIG,
        "rounds": RoundsSection(rounds=2),
        "local_epochs": 1,
        "batch_size": 32,
        "lr": 2e-3,
        "modality_dropout": 0.0,
        "exchange_projections": True,
        "calibration_noise": 0.0,
        "threads_per_client": 1,
    }
    return RunPlan(**{**base, **kw})  # type: ignore[arg-type]


def _run(
    plan: RunPlan, federation: FederatedData, shards: list[Arrays] | None = None, retries: int = 0
) -> FederationOutcome:
    """``plan`` on the federation's shards (or ``shards``), clients inline."""
    return run_federation(
        plan,
        InlineExecutor(retries),
        shards if shards is not None else [shard_arrays(s) for s in federation.shards],
        federation.test,
        make_strategy("fedavg", CrossModalNet.module_of),
    )


@pytest.fixture(scope="module")
def federation() -> FederatedData:
    data = clustered_embeddings(320)
    return build_federation(data, FederationSetup("per_sample", 0.5, 0.5, 3, 3, 20), 0.25)


def _by_hand(
    plan: RunPlan, shards: list[EmbeddingSet]
) -> tuple[dict[str, torch.Tensor], ClassPrototypes]:
    """The federation written out with the client's and the server's own pieces."""
    torch.manual_seed(plan.seed)
    state = CrossModalNet(plan.model).shareable_state_dict()
    memories: dict[int, dict[str, torch.Tensor]] = {}
    prototypes = None
    spec = ProjectionSpec(4, 16, 8)
    for rnd in range(plan.rounds.rounds):
        fold = StreamingFedAvg(state, CrossModalNet.module_of)
        sums = ProjectionAggregator(spec)
        for c, shard in enumerate(shards):
            client = CrossModalNet(plan.model)
            client.load_shareable_state_dict(state)
            if c in memories:
                client.memory.load_state_dict(memories[c])
            cfg = TrainConfig(
                epochs=1, batch_size=32, lr=2e-3, seed=client_seed(plan.seed, rnd, c), num_threads=1
            )
            result = train_local(client, shard, cfg, prototypes)
            weights = module_weights_of(result.num_samples, result.module_samples, fold.modules)
            fold.add(client.shareable_state_dict(), weights, result.num_samples)
            memories[c] = {k: v.clone() for k, v in client.memory.state_dict().items()}
            sent = compute_class_projections(client, shard).to_tensors()
            sums.add(f"client-{c}", rnd, {k: v.double() for k, v in sent.items()})
        state = fold.result()
        prototypes = ClassPrototypes.from_tensors(sums.sums())
    assert prototypes is not None
    assert all(int(m["count"].sum()) > 0 for m in memories.values())  # memory in play
    return state, prototypes


def test_a_run_is_the_daemons_federation_bit_for_bit(federation: FederatedData) -> None:
    plan = _plan()
    expected_state, expected_protos = _by_hand(plan, federation.shards)
    outcome = _run(plan, federation)
    assert outcome.state.keys() == expected_state.keys()
    for key, value in expected_state.items():
        assert torch.equal(outcome.state[key], value), key
    assert outcome.prototypes is not None
    for key, value in expected_protos.to_tensors().items():
        assert torch.equal(outcome.prototypes.to_tensors()[key], value), key
    rounds = outcome.record.rounds
    assert [r.round for r in rounds] == [1, 2] and all(r.reported == 3 for r in rounds)
    final = outcome.record.scores
    assert final == rounds[-1].scores and 0.0 <= final["text_only"]["accuracy"] <= 1.0


def test_sampling_is_seeded_sorted_and_sized_by_fraction() -> None:
    assert sample_clients(5, 1.0, 0, 0) == [0, 1, 2, 3, 4]
    picks = [sample_clients(1000, 0.1, 7, r) for r in range(3)]
    assert all(len(p) == 100 and p == sorted(p) and len(set(p)) == 100 for p in picks)
    assert picks[0] != picks[1] and sample_clients(1000, 0.1, 7, 0) == picks[0]
    assert sample_clients(1000, 0.1, 8, 0) != picks[0]
    assert len(sample_clients(3, 0.01, 0, 0)) == 1


def test_eval_every_scores_only_those_rounds_and_the_last(federation: FederatedData) -> None:
    plan = _plan(rounds=RoundsSection(rounds=3, eval_every=2, fraction=0.5))
    outcome = _run(plan, federation)
    rounds = outcome.record.rounds
    assert [r.scores is not None for r in rounds] == [False, True, True]
    assert [r.sampled for r in rounds] == [2, 2, 2]


def test_memory_packs_to_its_filled_entries_and_restores_exactly(federation: FederatedData) -> None:
    model = CrossModalNet(CONFIG)
    train_local(model, federation.shards[0], TrainConfig(epochs=4, batch_size=16, lr=2e-3, seed=1))
    memory = model.memory
    assert 0 < int(memory.count.sum()) < memory.count.numel() * memory.capacity
    packed = pack_memory(memory)
    assert packed["text"].shape == (int(memory.count.sum()), 16)
    restored = CrossModalNet(CONFIG)
    unpack_memory(restored.memory, {k: v.copy() for k, v in packed.items()})
    for name in ("text", "image", "count", "cursor"):
        assert torch.equal(getattr(restored.memory, name), getattr(memory, name)), name
    query = federation.test.text[:8]
    labels = federation.test.labels[:8]
    assert torch.equal(restored.memory.retrieve(query, labels), memory.retrieve(query, labels))
    unpack_memory(restored.memory, None)
    assert int(restored.memory.count.sum()) == 0


def test_calibration_runs_the_servers_ccvr_step(federation: FederatedData) -> None:
    plan = _plan(model=CONFIG.model_copy(update={"calibrate_image_classifier": True}))
    outcome = _run(plan, federation)
    assert outcome.record.calibration == "image-only last layers fitted"
    assert bool(outcome.state["image_calibration.ready"])
    assert outcome.record.scores != outcome.record.rounds[-1].scores


def _with_bad_client(federation: FederatedData, bad: int) -> list[Arrays]:
    """Shards where client ``bad`` holds a label the network has no class for: its
    train_local raises, as a broken client would."""
    shards = [shard_arrays(s) for s in federation.shards]
    labels = shards[bad]["labels"].copy()
    labels[0] = 99
    shards[bad] = {**shards[bad], "labels": labels}
    return shards


def test_a_failed_client_is_dropped_and_named(federation: FederatedData) -> None:
    outcome = _run(_plan(), federation, _with_bad_client(federation, 1), retries=1)
    assert [(r.reported, r.failed) for r in outcome.record.rounds] == [(2, [1]), (2, [1])]
    assert math.isfinite(outcome.record.scores["both"]["accuracy"])


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (RoundsSection(rounds=2, on_client_failure="fail"), "client 2 failed"),
        (RoundsSection(rounds=2, min_clients=3), "2 of 3 clients reported, min_clients is 3"),
    ],
)
def test_the_round_policy_stops_the_run(
    federation: FederatedData, policy: RoundsSection, message: str
) -> None:
    with pytest.raises(SimulationError, match=message):
        _run(_plan(rounds=policy), federation, _with_bad_client(federation, 2))


def test_a_round_that_cannot_reach_min_clients_is_refused_up_front(
    federation: FederatedData,
) -> None:
    with pytest.raises(SimulationError, match="1 of 3 clients are sampled"):
        _run(_plan(rounds=RoundsSection(rounds=1, fraction=0.2, min_clients=2)), federation)
