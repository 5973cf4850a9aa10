"""The commit runs outside the engine's lock: what an operator does while it runs (stop,
update_policy) must still hold once the commit ends, whatever the commit's outcome."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from crossfed.server.calibration_round import CalibrationStep
from crossfed.server.errors import CheckpointError, StateStoreError
from crossfed.server.round_attempt import ACTION_CALIBRATE, ACTION_TRAIN
from crossfed.server.round_engine import RoundEngine
from crossfed.server.round_policy import RoundPolicy
from crossfed.server.round_uploads import UploadOutcome
from crossfed.server.state.memory import InMemoryStateStore
from crossfed.server.state.records import EventRecord, RoundRecord, RunRecord
from crossfed.server.strategies.base import RoundResult
from crossfed.server.strategies.fedavg import FedAvg
from crossfed.server.strategies.robust_aggregation import MedianStrategy, MemoryBudgetError
from crossfed.server.update_validation import TensorSlot

from tests.support.engine_fixtures import BOTH, FakeClock, make_engine, small_state


def _fit(
    state: Mapping[str, torch.Tensor], summed: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor] | None, str]:
    out = {k: v.clone() for k, v in state.items()}
    out["fusion.bias"][:2] = (summed["sum"] / summed["count"]).float()
    return out, "fitted"


STEP = CalibrationStep(
    spec={"count": TensorSlot(torch.float64, (2,)), "sum": TensorSlot(torch.float64, (2,))},
    check=lambda tensors, num_samples: None,
    fit=_fit,
)


def _stats(counts: tuple[float, float], sums: tuple[float, float]) -> dict[str, torch.Tensor]:
    return {
        "count": torch.tensor(counts, dtype=torch.float64),
        "sum": torch.tensor(sums, dtype=torch.float64),
    }


def _send(
    engine: RoundEngine, cid: str, round_no: int, tensors: dict[str, torch.Tensor], n: int
) -> UploadOutcome:
    ticket = engine.uploads.begin(cid, round_no, f"{cid}-{round_no}", n, {})
    assert not isinstance(ticket, UploadOutcome)
    return engine.uploads.complete(ticket, tensors)


def _during_commit(engine: RoundEngine, round_no: int, action: object, fail: bool) -> None:
    """Run ``action`` inside the checkpoint write of ``round_no``'s commit (which then fails
    with a full disk when ``fail``): the commit runs without the lock, an operator can act."""
    original = engine.checkpoints.save

    def save(
        rnd: int, state: dict[str, torch.Tensor], run_id: str = "", prune: bool = True
    ) -> Path:
        if rnd == round_no:
            action()  # type: ignore[operator]
            if fail:
                raise OSError(28, "No space left on device")
        return original(rnd, state, run_id, prune)

    engine.checkpoints.save = save  # type: ignore[method-assign]


def test_stop_during_a_failing_commit_leaves_the_run_stopped(tmp_path: Path) -> None:
    """The operator's stop wins: the failed commit of the last allowed attempt must not turn
    the stopped run into a failed one."""
    engine = make_engine(tmp_path, FakeClock(), max_round_attempts=1)
    for cid in "ab":
        engine.register(cid, BOTH, 10)
    assert engine.heartbeat("a").action == ACTION_TRAIN
    _during_commit(engine, 1, lambda: engine.stop("operator"), fail=True)
    for cid in "ab":
        ticket = engine.uploads.begin(cid, 1, f"{cid}-1", 10, {})
        engine.uploads.complete(ticket, small_state(1))  # type: ignore[arg-type]
    run = engine.run
    assert run.state == "stopped", run.message
    assert run.last_committed_round == 0


def test_lowering_rounds_during_a_training_commit_does_not_skip_calibration(
    tmp_path: Path,
) -> None:
    """rounds lowered to 1 while round 2's training commit runs: round 2 is now the
    calibration round, so the training model must not be committed as round 2 (that would
    complete the run uncalibrated); the attempt is dropped uncounted and calibration runs."""
    engine = make_engine(tmp_path, FakeClock(), calibration=STEP, total_rounds=2)
    for cid in "ab":
        engine.register(cid, BOTH, 10)
    for round_no in (1, 2):
        for cid in "ab":
            assert engine.heartbeat(cid).action == ACTION_TRAIN
        if round_no == 2:
            _during_commit(
                engine,
                2,
                lambda: engine.update_policy(
                    RoundPolicy(total_rounds=1, min_clients=2, round_deadline_s=60.0)
                ),
                fail=False,
            )
        for cid in "ab":
            _send(engine, cid, round_no, small_state(round_no), 10)
    run = engine.run
    assert run.last_committed_round == 1 and run.state == "running", run.message
    dropped = [r for r in engine.store.list_rounds() if r.round == 2]
    assert len(dropped) == 1 and dropped[0].state == "failed"
    assert not dropped[0].counts_as_retry
    assert engine.heartbeat("a").action == ACTION_CALIBRATE


def test_raising_rounds_during_the_calibration_commit_reruns_it_as_training(
    tmp_path: Path,
) -> None:
    """rounds raised to 2 while the calibration round's commit runs: the calibrated model
    must not become training round 2; round 2 is re-run as training, then calibration."""
    engine = make_engine(tmp_path, FakeClock(), calibration=STEP, total_rounds=1)
    for cid in "ab":
        engine.register(cid, BOTH, 10)
    for cid in "ab":
        assert engine.heartbeat(cid).action == ACTION_TRAIN
    for cid in "ab":
        _send(engine, cid, 1, small_state(1), 10)
    assert engine.heartbeat("a").action == ACTION_CALIBRATE
    _during_commit(
        engine,
        2,
        lambda: engine.update_policy(
            RoundPolicy(total_rounds=2, min_clients=2, round_deadline_s=60.0)
        ),
        fail=False,
    )
    _send(engine, "a", 2, _stats((4, 6), (8, 30)), 10)
    _send(engine, "b", 2, _stats((6, 4), (4, 30)), 10)
    assert engine.run.last_committed_round == 1
    act = engine.heartbeat("a")
    assert act.action == ACTION_TRAIN and act.round == 2


def test_an_upload_the_aggregator_refuses_is_not_recorded_as_counted(tmp_path: Path) -> None:
    """A buffering strategy over its memory budget refuses an upload at fold time; the
    upload must not be stored as counted, or the client's retry is told "already counted"
    while the round never saw its update."""
    engine = make_engine(
        tmp_path, FakeClock(), strategy=MedianStrategy(max_buffer_bytes=200), min_clients=2
    )
    for cid in "abc":
        engine.register(cid, BOTH, 10)
    for cid in "abc":
        assert engine.heartbeat(cid).action == ACTION_TRAIN
    for cid in "ab":  # 100 bytes each: the budget is full
        _send(engine, cid, 1, small_state(1), 10)
    with pytest.raises(MemoryBudgetError):
        _send(engine, "c", 1, small_state(1), 10)
    assert engine.store.get_upload(1, 1, "c", "c-1") is None
    retry = engine.uploads.begin("c", 1, "c-1", 10, {})
    assert not isinstance(retry, UploadOutcome), retry.message
    assert engine.open_round is not None and engine.open_round.received == 2


class _BrokenStep(FedAvg):
    """FedAvg whose server step raises (a bug in a strategy)."""

    def finish_round(
        self, global_state: Mapping[str, torch.Tensor], aggregate: RoundResult
    ) -> dict[str, torch.Tensor]:
        raise RuntimeError("strategy bug")


def test_a_commit_whose_rollback_also_fails_still_records_the_failed_round(
    tmp_path: Path,
) -> None:
    """The commit raises, and so does restoring the strategy's state: the attempt is still
    recorded failed and its clients released (nothing escapes to the uploader / kills the
    committer thread), and the run is not left training on an unrestored strategy."""
    engine = make_engine(tmp_path, FakeClock(), strategy=_BrokenStep())
    for cid in "ab":
        engine.register(cid, BOTH, 10)
    for cid in "ab":
        assert engine.heartbeat(cid).action == ACTION_TRAIN

    def unreadable(round_no: int) -> dict[str, torch.Tensor] | None:
        raise CheckpointError("strategy state strategy-000000.safetensors is corrupt")

    engine.checkpoints.load_strategy_state = unreadable  # type: ignore[method-assign]
    for cid in "ab":
        _send(engine, cid, 1, small_state(1), 10)
    attempts = [r for r in engine.store.list_rounds() if r.round == 1]
    assert [r.state for r in attempts] == ["failed"]
    assert all(c.state == "registered" for c in engine.clients())
    assert engine.run.state == "failed" and "strategy" in engine.run.message


class _NoCommitEvent(InMemoryStateStore):
    """A store whose event log refuses the round_committed event (a locked database)."""

    def append_event(self, kind: str, *args: Any, **kwargs: Any) -> EventRecord:
        if kind == "round_committed":
            raise StateStoreError("state database: database is locked")
        return super().append_event(kind, *args, **kwargs)


def test_a_refused_commit_event_does_not_undo_the_rest_of_a_recorded_commit(
    tmp_path: Path,
) -> None:
    """The commit is recorded (database, memory) before its event: an event log that refuses
    it must not skip the rest (completing the run, pruning) nor reach the uploader as an
    error for an update that was counted and committed."""
    engine = make_engine(tmp_path, FakeClock(), store=_NoCommitEvent(), total_rounds=1)
    for cid in "ab":
        engine.register(cid, BOTH, 10)
    for cid in "ab":
        assert engine.heartbeat(cid).action == ACTION_TRAIN
    _send(engine, "a", 1, small_state(1), 10)
    assert _send(engine, "b", 1, small_state(1), 10).accepted
    run = engine.run
    assert run.last_committed_round == 1 and run.state == "completed"


class _CommitBug(InMemoryStateStore):
    """A store whose commit_round fails with something other than StateStoreError."""

    def commit_round(self, record: RoundRecord, run: RunRecord) -> None:
        raise TypeError("cannot serialize the round record")


def test_an_unexpected_error_recording_the_commit_leaves_memory_at_the_last_commit(
    tmp_path: Path,
) -> None:
    """Memory must not run ahead of the database whatever the store raises: the round is
    failed and re-run from the last committed model, not counted as committed in memory."""
    engine = make_engine(tmp_path, FakeClock(), store=_CommitBug())
    for cid in "ab":
        engine.register(cid, BOTH, 10)
    for cid in "ab":
        assert engine.heartbeat(cid).action == ACTION_TRAIN
    for cid in "ab":
        _send(engine, cid, 1, small_state(1), 10)
    assert engine.run.last_committed_round == 0
    assert [r.state for r in engine.store.list_rounds() if r.round == 1] == ["failed"]
    act = engine.heartbeat("a")
    assert act.action == ACTION_TRAIN and act.round == 1 and act.attempt == 2
