"""The calibration round after the last training round (server/calibration_round.py):
who is asked, what is accepted, the statistics are summed exactly, the fitted model is the
run's last checkpoint, and every way it can go wrong still ends the run with a usable model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from crossfed.common.wire.tensor_codec import encode_tensors
from crossfed.server.calibration_round import CalibrationStep
from crossfed.server.errors import InvalidUpdateError, WrongRoundError
from crossfed.server.round_attempt import ACTION_CALIBRATE, ACTION_DONE, ACTION_TRAIN, ACTION_WAIT
from crossfed.server.round_engine import RoundEngine
from crossfed.server.round_policy import RoundPolicy
from crossfed.server.round_uploads import UploadOutcome
from crossfed.server.state.sqlite import SqliteStateStore
from crossfed.server.update_validation import TensorSlot

from tests.support.engine_fixtures import (
    BOTH,
    IMAGE_ONLY,
    TEXT_ONLY,
    FakeClock,
    make_engine,
    small_state,
)

SPEC = {"count": TensorSlot(torch.float64, (2,)), "sum": TensorSlot(torch.float64, (2,))}


def _check(tensors: Mapping[str, torch.Tensor], num_samples: int) -> None:
    if int(tensors["count"].sum()) != num_samples:
        raise InvalidUpdateError("count does not add up to num_samples")


def _fit(
    state: Mapping[str, torch.Tensor], summed: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """Toy fit: fusion.bias[:2] = per-class means of the summed statistics."""
    if int((summed["count"] > 0).sum()) < 2:
        return None, "too few classes; left uncalibrated"
    out = {k: v.clone() for k, v in state.items()}
    out["fusion.bias"][:2] = (summed["sum"] / summed["count"]).float()
    return out, "fitted"


STEP = CalibrationStep(spec=SPEC, check=_check, fit=_fit)


def _engine(
    tmp_path: Path, clock: FakeClock, step: CalibrationStep = STEP, **kw: object
) -> RoundEngine:
    return make_engine(tmp_path, clock, calibration=step, **{"total_rounds": 1, **kw})


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


def _train_round_one(engine: RoundEngine, *cids: str) -> None:
    for cid in cids:
        assert engine.heartbeat(cid).action == ACTION_TRAIN
    for cid in cids:
        _send(engine, cid, 1, small_state(), 10)


def _calibrating(tmp_path: Path, **kw: object) -> tuple[RoundEngine, FakeClock]:
    """Two paired clients "a" and "b" after the one training round, calibration round open."""
    clock = FakeClock()
    engine = _engine(tmp_path, clock, **kw)
    engine.register("a", BOTH, 10)
    engine.register("b", BOTH, 10)
    _train_round_one(engine, "a", "b")
    assert engine.heartbeat("a").action == ACTION_CALIBRATE
    return engine, clock


def test_image_holders_calibrate_and_the_fitted_model_completes_the_run(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = _engine(tmp_path, clock, min_clients=3)
    engine.register("both", BOTH, 10, num_paired=10)
    engine.register("img", IMAGE_ONLY, 10, num_image_only=10)
    engine.register("txt", TEXT_ONLY, 10, num_text_only=10)
    _train_round_one(engine, "both", "img", "txt")
    assert engine.run.last_committed_round == 1 and engine.run.state == "running"

    acts = {cid: engine.heartbeat(cid) for cid in ("both", "img", "txt")}
    assert acts["both"].action == acts["img"].action == ACTION_CALIBRATE
    assert acts["both"].round == 2
    assert acts["txt"].action == ACTION_WAIT  # no images, nothing to contribute
    # the calibration round downloads the final training model (its input, version 1)
    assert engine.downloads.model_bytes(2)[0] == 1

    assert _send(engine, "both", 2, _stats((4, 6), (8, 30)), 10).accepted
    out = _send(engine, "img", 2, _stats((6, 4), (4, 30)), 10)
    assert out.round_closed
    final = engine.checkpoints.load(2)
    # exact pooled means: class 0 (8+4)/(4+6) = 1.2, class 1 (30+30)/(6+4) = 6
    assert torch.allclose(final["fusion.bias"][:2], torch.tensor([1.2, 6.0]))
    assert torch.equal(final["mapper.weight"], engine.checkpoints.load(1)["mapper.weight"])
    run = engine.run
    assert run.state == "completed" and run.last_committed_round == 2
    assert "calibration" in run.message and "2 client(s): fitted" in run.message
    assert engine.heartbeat("txt").action == ACTION_DONE
    assert engine.clients()[1].rounds_completed == 1  # calibration is not a training round


def test_bad_statistics_are_refused_and_leave_the_sum_untouched(tmp_path: Path) -> None:
    engine, _ = _calibrating(tmp_path)
    with pytest.raises(InvalidUpdateError, match="num_samples"):
        _send(engine, "a", 2, _stats((1, 1), (0, 0)), 10)  # counts claim 2 rows, not 10
    with pytest.raises(InvalidUpdateError):  # weights where statistics are expected
        _send(engine, "a", 2, small_state(), 10)  # type: ignore[arg-type]
    with pytest.raises(InvalidUpdateError, match="exceeds"):
        engine.uploads.begin("a", 2, "x", 11, {})  # more rows than it registered
    assert engine.projection_spec is not None
    shapes = engine.projection_spec.shapes()
    projections = encode_tensors(
        {k: torch.zeros(v, dtype=torch.float64) for k, v in shapes.items()}
    )
    with pytest.raises(WrongRoundError, match="calibration"):
        engine.projection_exchange.exchange("a", 2, projections)
    _send(engine, "a", 2, _stats((5, 5), (5, 10)), 10)
    _send(engine, "b", 2, _stats((5, 5), (5, 10)), 10)
    assert torch.allclose(engine.checkpoints.load(2)["fusion.bias"][:2], torch.tensor([1.0, 2.0]))


def test_no_online_image_holder_completes_the_run_uncalibrated(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = _engine(tmp_path, clock)
    engine.register("t1", TEXT_ONLY, 10, num_text_only=10)
    engine.register("t2", TEXT_ONLY, 10, num_text_only=10)
    _train_round_one(engine, "t1", "t2")
    assert engine.heartbeat("t1").action == ACTION_DONE
    run = engine.run
    assert run.state == "completed" and run.last_committed_round == 1
    assert "calibration skipped" in run.message and "paths (image) need" in run.message


def test_failed_calibration_attempts_end_the_run_completed_not_failed(tmp_path: Path) -> None:
    engine, clock = _calibrating(tmp_path, max_round_attempts=2)
    for _ in range(2):  # two attempts, nobody sends statistics before the deadline
        engine.heartbeat("a"), engine.heartbeat("b")
        assert engine.open_round is not None and engine.open_round.round == 2
        clock.advance(61)
        engine.tick()
    run = engine.run
    assert run.state == "completed" and run.last_committed_round == 1
    assert "failed 2 time(s)" in run.message


def test_too_few_classes_commit_the_training_model_unchanged(tmp_path: Path) -> None:
    engine, _ = _calibrating(tmp_path)
    _send(engine, "a", 2, _stats((10, 0), (3, 0)), 10)
    _send(engine, "b", 2, _stats((0, 0), (0, 0)), 0)  # a client that declines sends zeros
    assert engine.run.state == "completed"
    assert "left uncalibrated" in engine.run.message
    assert torch.equal(
        engine.checkpoints.load(2)["fusion.bias"], engine.checkpoints.load(1)["fusion.bias"]
    )


def test_a_restart_during_calibration_reruns_it_from_the_same_model(tmp_path: Path) -> None:
    clock = FakeClock()
    db = tmp_path / "state.db"
    engine = _engine(tmp_path, clock, store=SqliteStateStore(db))
    engine.register("a", BOTH, 10)
    engine.register("b", BOTH, 10)
    _train_round_one(engine, "a", "b")
    engine.heartbeat("a")
    _send(engine, "a", 2, _stats((5, 5), (5, 5)), 10)  # lost with the process
    engine.store.close()  # type: ignore[attr-defined]

    again = _engine(tmp_path, clock, store=SqliteStateStore(db))
    again.register("a", BOTH, 10)
    again.register("b", BOTH, 10)
    act = again.heartbeat("a")
    assert act.action == ACTION_CALIBRATE and act.round == 2 and act.attempt == 2
    _send(again, "a", 2, _stats((5, 5), (10, 20)), 10)
    _send(again, "b", 2, _stats((5, 5), (10, 20)), 10)
    assert again.run.state == "completed"
    assert torch.allclose(again.checkpoints.load(2)["fusion.bias"][:2], torch.tensor([2.0, 4.0]))


def test_raising_rounds_during_calibration_turns_it_back_into_training(tmp_path: Path) -> None:
    engine, _ = _calibrating(tmp_path)
    engine.update_policy(RoundPolicy(total_rounds=2, min_clients=2, round_deadline_s=60.0))
    act = engine.heartbeat("a")
    assert act.action == ACTION_TRAIN and act.round == 2
    failed = [r for r in engine.store.list_rounds() if r.state == "failed"]
    assert len(failed) == 1 and not failed[0].counts_as_retry  # the dropped calibration
    engine.heartbeat("b")
    _send(engine, "a", 2, small_state(), 10)
    _send(engine, "b", 2, small_state(), 10)
    assert engine.heartbeat("a").action == ACTION_CALIBRATE  # round 3 now calibrates


def test_a_text_path_calibration_asks_the_text_only_clients_too(tmp_path: Path) -> None:
    """Each client holding rows of a calibrated path's modality is asked: with the text path
    on, text-only clients calibrate; with the image path alone they do not."""
    both_paths = CalibrationStep(spec=SPEC, check=_check, fit=_fit, paths=("image", "text"))
    for step, text_client_asked in ((both_paths, True), (STEP, False)):
        clock = FakeClock()
        engine = _engine(tmp_path / str(text_client_asked), clock, step)
        engine.register("t", TEXT_ONLY, 10, num_text_only=10)
        engine.register("i", IMAGE_ONLY, 10, num_image_only=10)
        _train_round_one(engine, "t", "i")
        assert engine.heartbeat("i").action == ACTION_CALIBRATE
        asked = engine.heartbeat("t").action == ACTION_CALIBRATE
        assert asked is text_client_asked
