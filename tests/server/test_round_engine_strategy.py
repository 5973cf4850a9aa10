"""The engine runs a `Strategy`: its instructions reach the clients with the round, its state
is checkpointed with each commit and restored after a restart, and the commit runs off the
lock (a heartbeat answers while a commit is held inside its checkpoint write)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from crossfed.server.checkpoints import CheckpointStore
from crossfed.server.errors import ConfigurationError
from crossfed.server.projection_exchange import ProjectionSpec
from crossfed.server.round_attempt import ACTION_TRAIN, ACTION_WAIT
from crossfed.server.round_engine import RoundEngine
from crossfed.server.round_policy import RoundPolicy
from crossfed.server.state.sqlite import SqliteStateStore
from crossfed.server.strategies.base import ModuleOf, RoundInstructions, RoundResult
from crossfed.server.strategies.fedavg import FedAvg, FedAvgAggregator

from tests.support.engine_fixtures import BOTH, FakeClock, module_of, small_state


class _CountingStrategy(FedAvg):
    """FedAvg with server state (a running sum of the aggregates' fusion bias) and a mu."""

    name = "counting"

    def __init__(self) -> None:
        super().__init__(proximal_mu=0.25)
        self.state: dict[str, torch.Tensor] = {"rounds": torch.zeros(1), "bias": torch.zeros(4)}

    def configure_round(self, round_no: int) -> RoundInstructions:
        return RoundInstructions(
            proximal_mu=self.proximal_mu * round_no, logit_adjustment=0.1 * round_no
        )

    def begin_round(
        self, global_state: Mapping[str, torch.Tensor], module_of: ModuleOf
    ) -> FedAvgAggregator:
        return FedAvgAggregator(global_state, module_of)

    def finish_round(
        self, global_state: Mapping[str, torch.Tensor], aggregate: RoundResult
    ) -> dict[str, torch.Tensor]:
        self.state = {
            "rounds": self.state["rounds"] + 1,
            "bias": self.state["bias"] + aggregate.state["fusion.bias"],
        }
        return aggregate.state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = dict(state) or {"rounds": torch.zeros(1), "bias": torch.zeros(4)}


class _HeldCheckpoints(CheckpointStore):
    """A checkpoint store whose writes of round >= 1 wait on an event (a slow disk)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, keep_last=2)
        self.entered = threading.Event()
        self.release = threading.Event()

    def save(
        self, round_no: int, state: dict[str, torch.Tensor], run_id: str = "", prune: bool = True
    ) -> Path:
        if round_no >= 1:
            self.entered.set()
            assert self.release.wait(30.0), "the test never released the commit"
        return super().save(round_no, state, run_id, prune)


def _engine(
    tmp_path: Path,
    clock: FakeClock,
    strategy: FedAvg,
    checkpoints: CheckpointStore | None = None,
    inline: bool = True,
    commit_wait_s: float = 0.0,
) -> RoundEngine:
    return RoundEngine(
        SqliteStateStore(tmp_path / "state.db"),
        checkpoints or CheckpointStore(tmp_path / "ckpt", keep_last=2),
        small_state(),
        module_of,
        RoundPolicy(total_rounds=3, min_clients=2, round_deadline_s=60.0),
        projection_spec=ProjectionSpec(num_classes=2, text_dim=3, image_dim=2),
        strategy=strategy,
        clock=clock,
        commit_inline=inline,
        commit_wait_s=commit_wait_s,
    )


def _upload_round(engine: RoundEngine, round_no: int, seed: int) -> None:
    for cid in "ab":
        ticket = engine.uploads.begin(cid, round_no, f"{cid}-{round_no}", 10, {})
        engine.uploads.complete(ticket, small_state(seed))  # type: ignore[arg-type]


def test_instructions_reach_clients_and_state_survives_a_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    strategy = _CountingStrategy()
    engine = _engine(tmp_path, clock, strategy)
    for cid in "ab":
        engine.register(cid, BOTH, 10)
    for round_no in (1, 2):
        action = engine.heartbeat("a")
        assert action.action == ACTION_TRAIN and action.round == round_no
        assert action.instructions.proximal_mu == pytest.approx(0.25 * round_no)
        assert action.instructions.logit_adjustment == pytest.approx(0.1 * round_no)
        _upload_round(engine, round_no, seed=round_no + 20)
    assert engine.run.last_committed_round == 2
    expected = {k: v.clone() for k, v in strategy.state.items()}
    assert float(expected["rounds"]) == 2.0
    # the process dies; a new engine over the same database and checkpoint directory
    del engine
    restarted = _CountingStrategy()
    again = _engine(tmp_path, clock, restarted)
    assert again.run.last_committed_round == 2
    assert set(restarted.state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(restarted.state[key], value)
    # the strategy files are pruned with the checkpoints (keep_last=2)
    for cid in "ab":
        again.register(cid, BOTH, 10)
    again.heartbeat("a")
    _upload_round(again, 3, seed=23)
    assert float(restarted.state["rounds"]) == 3.0
    kept = sorted(p.name for p in (tmp_path / "ckpt").glob("strategy-*.safetensors"))
    assert kept == ["strategy-000002.safetensors", "strategy-000003.safetensors"]


def test_resuming_with_a_strategy_that_cannot_take_the_saved_state_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    engine = _engine(tmp_path, clock, _CountingStrategy())
    for cid in "ab":
        engine.register(cid, BOTH, 10)
    engine.heartbeat("a")
    _upload_round(engine, 1, seed=21)
    del engine
    with pytest.raises(ConfigurationError, match="strategy 'fedavg' cannot resume this run") as err:
        _engine(tmp_path, clock, FedAvg())  # stateless: refuses the saved running sums
    assert "\n" not in str(err.value) and "round 1" in str(err.value)


def test_a_failed_commit_does_not_advance_the_strategy_state(tmp_path: Path) -> None:
    """A round whose checkpoint cannot be written is re-run; the strategy's step on the
    failed attempt is rolled back to the last committed round's state."""
    clock = FakeClock()
    strategy = _CountingStrategy()
    engine = _engine(tmp_path, clock, strategy)
    for cid in "ab":
        engine.register(cid, BOTH, 10)
    engine.heartbeat("a")
    _upload_round(engine, 1, seed=5)
    committed = {k: v.clone() for k, v in strategy.state.items()}
    original = engine.checkpoints.save

    def refuse(*args: object, **kwargs: object) -> Path:
        raise OSError(28, "No space left on device")

    engine.checkpoints.save = refuse  # type: ignore[method-assign]
    engine.heartbeat("a")
    _upload_round(engine, 2, seed=6)
    assert engine.run.last_committed_round == 1
    for key, value in committed.items():
        assert torch.equal(strategy.state[key], value)
    engine.checkpoints.save = original  # type: ignore[method-assign]
    engine.heartbeat("a")
    assert engine.open_round is not None and engine.open_round.attempt == 2


def test_heartbeats_and_registrations_answer_while_a_commit_is_held(tmp_path: Path) -> None:
    clock = FakeClock()
    checkpoints = _HeldCheckpoints(tmp_path / "ckpt")
    engine = _engine(tmp_path, clock, FedAvg(), checkpoints, inline=False)
    for cid in "ab":
        engine.register(cid, BOTH, 10)
    engine.heartbeat("a")
    _upload_round(engine, 1, seed=3)  # the last upload closes the round: the commit starts
    assert checkpoints.entered.wait(30.0)
    try:
        # the commit is inside its checkpoint write; these must not wait for it
        done = threading.Event()
        answers: list[int] = []

        def poll() -> None:
            answers.append(engine.heartbeat("a").action)
            engine.register("c", BOTH, 10)
            answers.append(engine.heartbeat("c").action)
            done.set()

        threading.Thread(target=poll, daemon=True).start()
        assert done.wait(10.0), "a heartbeat blocked on the held commit"
        assert answers == [ACTION_WAIT, ACTION_WAIT]
        assert not engine.wait_idle(0.0)
        assert engine.run.last_committed_round == 0
    finally:
        checkpoints.release.set()
    assert engine.wait_idle(30.0)
    assert engine.run.last_committed_round == 1


def _round_one_commit_held(tmp_path: Path) -> tuple[RoundEngine, _HeldCheckpoints]:
    """Clients a and b uploaded round 1; its commit is inside the held checkpoint write."""
    checkpoints = _HeldCheckpoints(tmp_path / "ckpt")
    engine = _engine(tmp_path, FakeClock(), FedAvg(), checkpoints, inline=False, commit_wait_s=60)
    for cid in "ab":
        engine.register(cid, BOTH, 10)
    engine.heartbeat("a")
    _upload_round(engine, 1, seed=3)
    assert checkpoints.entered.wait(30.0)
    return engine, checkpoints


def test_a_participants_heartbeat_is_held_through_the_commit_and_gets_the_next_round(
    tmp_path: Path,
) -> None:
    """Long-poll: a client whose update is in the committing round hears TRAIN for the next
    round as soon as the commit ends, not one poll interval later."""
    engine, checkpoints = _round_one_commit_held(tmp_path)
    answers: list[tuple[int, int]] = []
    done = threading.Event()

    def beat() -> None:
        action = engine.heartbeat("a")
        answers.append((action.action, action.round))
        done.set()

    threading.Thread(target=beat, daemon=True).start()
    checkpoints.release.set()
    assert done.wait(30.0), "the held heartbeat never answered"
    assert answers == [(ACTION_TRAIN, 2)]


def test_a_client_cannot_hold_two_heartbeats_through_a_commit(tmp_path: Path) -> None:
    """One held heartbeat per client: another call from it answers WAIT at once, so a client
    cannot tie up the server's RPC threads by heartbeating in parallel."""
    engine, checkpoints = _round_one_commit_held(tmp_path)
    try:
        engine._commit_waiters.add("a")  # as if a first heartbeat of "a" were being held
        answers: list[int] = []
        done = threading.Event()

        def beat() -> None:
            answers.append(engine.heartbeat("a").action)
            done.set()

        threading.Thread(target=beat, daemon=True).start()
        assert done.wait(10.0), "a second heartbeat of the same client was held"
        assert answers == [ACTION_WAIT]
    finally:
        checkpoints.release.set()
    assert engine.wait_idle(30.0)


class _NamingAggregator(FedAvgAggregator):
    """FedAvg's aggregator, noting who sent each upload it folds."""

    def __init__(self, *args: object, senders: list[str]) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.senders = senders

    def add(
        self,
        update: Mapping[str, torch.Tensor],
        weights: Mapping[str, float],
        num_samples: int,
        scale: float = 1.0,
        client: str = "",
    ) -> None:
        self.senders.append(client)
        super().add(update, weights, num_samples, scale, client)


def test_the_strategy_is_told_who_sent_each_upload(tmp_path: Path) -> None:
    """Strategies that remember clients across rounds (anchored_mean's drop record) get the
    registered client id with every upload, from the round engine's fold."""
    senders: list[str] = []

    class Naming(_CountingStrategy):
        def begin_round(
            self, global_state: Mapping[str, torch.Tensor], module_of: ModuleOf
        ) -> FedAvgAggregator:
            return _NamingAggregator(global_state, module_of, senders=senders)

    engine = _engine(tmp_path, FakeClock(), Naming())
    for cid in "ab":
        engine.register(cid, BOTH, 10)
    engine.heartbeat("a")
    _upload_round(engine, 1, seed=3)
    assert engine.run.last_committed_round == 1
    assert senders == ["a", "b"]
