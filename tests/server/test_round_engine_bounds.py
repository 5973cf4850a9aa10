"""The engine's guards against one hostile update: an update past the norm bound is folded in
clipped (event), an aggregate that overflows fails the attempt and keeps the last good model
(bound off, so the overflow can happen), and a checkpoint with unusable values is reported as
such at restart, not as a different model configuration."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from crossfed.server.checkpoints import CheckpointStore
from crossfed.server.errors import CheckpointError
from crossfed.server.round_engine import RoundEngine
from crossfed.server.round_policy import RoundPolicy
from crossfed.server.round_uploads import UploadOutcome, UploadTicket
from crossfed.server.state.memory import InMemoryStateStore
from crossfed.server.update_bound import UpdateBound

from tests.support.engine_fixtures import BOTH, FakeClock, module_of, small_state


def _engine(tmp_path: Path, clock: FakeClock, bound: UpdateBound | None) -> RoundEngine:
    return RoundEngine(
        InMemoryStateStore(),
        CheckpointStore(tmp_path / "ckpt", keep_last=2),
        small_state(),
        module_of,
        RoundPolicy(total_rounds=2, min_clients=2, round_deadline_s=60.0),
        update_bound=bound,
        clock=clock,
        commit_inline=True,
    )


def _round_one(engine: RoundEngine, updates: dict[str, dict[str, torch.Tensor]]) -> None:
    for cid in updates:
        engine.register(cid, BOTH, 10)
    engine.tick()
    for cid, state in updates.items():
        ticket = engine.uploads.begin(cid, 1, f"{cid}-1", 10, {})
        assert isinstance(ticket, UploadTicket)
        assert isinstance(engine.uploads.complete(ticket, state), UploadOutcome)


def _filled(value: float) -> dict[str, torch.Tensor]:
    return {
        k: torch.full_like(v, value) if v.is_floating_point() else v
        for k, v in small_state().items()
    }


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(
        sum(
            float((a[k].double() - b[k].double()).pow(2).sum())
            for k in a
            if a[k].is_floating_point()
        )
    )


def test_an_update_past_the_bound_is_clipped_to_it(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = _engine(tmp_path, clock, UpdateBound(0.5))
    start = small_state()
    honest = {k: v.clone() for k, v in start.items()}
    _round_one(engine, {"honest": honest, "hostile": _filled(3.0e38)})
    assert engine.run.last_committed_round == 1
    model = engine.global_state
    assert all(bool(torch.isfinite(v).all()) for v in model.values())
    reference = max(_distance(start, {k: torch.zeros_like(v) for k, v in start.items()}), 1.0)
    # half of the weight is the hostile update, clipped to 0.5 x the model's norm
    assert _distance(model, start) == pytest.approx(0.5 * 0.5 * reference, rel=1e-4)
    clipped = [e for e in engine.store.events_after(0) if e.kind == "update_clipped"]
    assert [e.client_id for e in clipped] == ["hostile"]
    accepted = {
        e.client_id: e.values for e in engine.store.events_after(0) if e.kind == "upload_accepted"
    }
    assert accepted["honest"]["update_norm_ratio"] == 0.0


def test_an_overflowing_aggregate_fails_the_attempt_and_keeps_the_model(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = _engine(tmp_path, clock, None)  # no bound: finite updates whose sum overflows
    before = engine.global_state
    _round_one(engine, {"a": _filled(3.0e38), "b": _filled(3.0e38)})
    assert engine.run.last_committed_round == 0
    assert all(torch.equal(engine.global_state[k], before[k]) for k in before)
    events = engine.store.events_after(0)
    rejected = [e for e in events if e.kind == "aggregate_rejected"]
    assert rejected and "NaN or infinite" in rejected[0].message
    assert any(e.kind == "round_failed" for e in events)
    assert engine.run.state == "running"  # the attempt is retried


def test_a_checkpoint_with_unusable_values_is_named_as_such_at_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    store = InMemoryStateStore()

    def start() -> RoundEngine:
        return RoundEngine(
            store,
            CheckpointStore(tmp_path / "ckpt", keep_last=2),
            small_state(),
            module_of,
            RoundPolicy(total_rounds=2, min_clients=2),
            clock=clock,
            commit_inline=True,
        )

    start()  # creates the run and checkpoint 0
    poisoned = {
        k: torch.full_like(v, math.inf) if v.is_floating_point() else v
        for k, v in small_state().items()
    }
    CheckpointStore(tmp_path / "ckpt").save(0, poisoned)
    with pytest.raises(CheckpointError, match="poisoned model") as err:
        start()
    assert "different model configuration" not in str(err.value)
