"""Round engine: selection, deadlines (fake clock), min_clients failure + retry/end,
straggler cut-off, completion, duplicate and late uploads, resume after restart."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from crossfed.server.errors import (
    AlreadyUploadedError,
    InvalidUpdateError,
    NotSelectedError,
    StateStoreError,
    UnknownClientError,
    WrongRoundError,
)
from crossfed.server.round_attempt import ACTION_DONE, ACTION_REGISTER, ACTION_TRAIN, ACTION_WAIT
from crossfed.server.round_engine import RoundEngine
from crossfed.server.round_uploads import UploadOutcome, UploadTicket
from crossfed.server.state.memory import InMemoryStateStore
from crossfed.server.state.records import (
    ClientRecord,
    EventRecord,
    RoundRecord,
    RunRecord,
    UploadRecord,
)
from crossfed.server.state.sqlite import SqliteStateStore

from tests.support.engine_fixtures import BOTH, IMAGE_ONLY, FakeClock, make_engine, small_state


def _register(engine: RoundEngine, *ids: str, samples: int = 10) -> None:
    for cid in ids:
        engine.register(cid, BOTH, samples)


def _committed(engine: RoundEngine, round_no: int) -> RoundRecord:
    found = [
        r for r in engine.store.list_rounds() if r.round == round_no and r.state == "committed"
    ]
    assert len(found) == 1, found
    return found[0]


def _upload(
    engine: RoundEngine,
    cid: str,
    round_no: int,
    state: dict[str, torch.Tensor],
    samples: int = 10,
    upload_id: str | None = None,
    module_samples: dict[str, int] | None = None,
) -> UploadOutcome:
    ticket = engine.uploads.begin(
        cid, round_no, upload_id or f"{cid}-{round_no}", samples, module_samples or {}
    )
    if isinstance(ticket, UploadOutcome):
        return ticket
    assert isinstance(ticket, UploadTicket)
    return engine.uploads.complete(ticket, state)


def test_round_opens_when_min_clients_online_and_selects_fraction(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = make_engine(tmp_path, clock, min_clients=2, fraction=0.5)
    _register(engine, "a")
    assert engine.heartbeat("a").action == ACTION_WAIT  # 1 < min_clients
    _register(engine, "b", "c", "d", "e")
    actions = {cid: engine.heartbeat(cid) for cid in "abcde"}
    opened = engine.open_round
    assert opened is not None and opened.round == 1
    assert len(opened.selected) == 3  # ceil(0.5 * 5)
    for cid, act in actions.items():
        expected = ACTION_TRAIN if cid in opened.selected else ACTION_WAIT
        assert act.action == expected, cid
        if expected == ACTION_TRAIN:
            assert act.round == 1 and act.deadline_unix_s == clock.now + 60.0


def test_selection_is_deterministic_per_seed(tmp_path: Path) -> None:
    picks = []
    for sub in ("x", "y"):
        engine = make_engine(tmp_path / sub, FakeClock(), fraction=0.3, min_clients=1)
        _register(engine, *[f"c{i}" for i in range(10)])
        engine.tick()
        assert engine.open_round is not None
        picks.append(engine.open_round.selected)
    assert picks[0] == picks[1] and len(picks[0]) == 3


def test_full_run_completes_and_clients_are_told_done(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = make_engine(tmp_path, clock, total_rounds=2)
    _register(engine, "a", "b")
    for round_no in (1, 2):
        assert engine.heartbeat("a").action == ACTION_TRAIN
        for cid in "ab":
            _upload(engine, cid, round_no, small_state(round_no))
    assert engine.run.state == "completed"
    assert engine.run.last_committed_round == 2
    assert engine.heartbeat("a").action == ACTION_DONE
    assert engine.checkpoints.rounds() == [1, 2]  # keep_last=2


def test_deadline_commits_with_min_clients_and_drops_straggler(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = make_engine(tmp_path, clock, min_clients=2)
    _register(engine, "a", "b", "c")
    engine.tick()
    _upload(engine, "a", 1, small_state(1))
    _upload(engine, "b", 1, small_state(2))
    clock.advance(59)
    engine.tick()
    assert engine.open_round is not None  # still waiting for c
    clock.advance(2)
    for cid in "ab":
        engine.heartbeat(cid)
    engine.tick()
    assert engine.run.last_committed_round == 1
    record = _committed(engine, 1)
    assert record.received == 2 and "deadline" in record.message


def test_straggler_cutoff_closes_after_wait_after_min(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = make_engine(tmp_path, clock, min_clients=2, wait_after_min_s=5.0)
    _register(engine, "a", "b", "c")
    engine.tick()
    _upload(engine, "a", 1, small_state(1))
    clock.advance(10)
    engine.heartbeat("a"), engine.heartbeat("b"), engine.heartbeat("c")
    assert engine.open_round is not None  # only 1 < min_clients uploaded: no cut-off yet
    _upload(engine, "b", 1, small_state(2))
    clock.advance(4)
    engine.tick()
    assert engine.open_round is not None
    clock.advance(1.5)
    engine.tick()
    assert engine.run.last_committed_round == 1
    assert "straggler" in _committed(engine, 1).message


def test_round_fails_below_min_clients_then_retries_then_run_fails(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = make_engine(tmp_path, clock, min_clients=2, max_round_attempts=2)
    _register(engine, "a", "b")
    engine.tick()
    _upload(engine, "a", 1, small_state(1))
    clock.advance(61)
    engine.heartbeat("a"), engine.heartbeat("b")
    attempts = engine.store.list_rounds()
    assert attempts[-1].state == "failed" and "min_clients" in attempts[-1].message
    # retry: attempt 2 of the same round, from the same input model
    opened = engine.open_round
    assert opened is not None and (opened.round, opened.attempt) == (1, 2)
    assert engine.heartbeat("b").action == ACTION_TRAIN
    clock.advance(61)
    engine.heartbeat("a")
    assert engine.run.state == "failed"
    assert "failed 2 time(s)" in engine.run.message
    assert engine.heartbeat("a").action == ACTION_DONE
    assert engine.run.last_committed_round == 0


def test_waiting_for_clients_times_out_and_never_hangs(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = make_engine(tmp_path, clock, min_clients=3, start_timeout_s=30, max_round_attempts=1)
    _register(engine, "a")
    engine.tick()
    clock.advance(31)
    engine.heartbeat("a")
    assert engine.run.state == "failed"
    assert "only 1 client(s) online" in engine.run.message


def test_duplicate_upload_is_acknowledged_and_not_counted_twice(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = make_engine(tmp_path, clock, min_clients=2)
    _register(engine, "a", "b", "c")
    engine.tick()
    first = _upload(engine, "a", 1, small_state(1), upload_id="u1")
    again = _upload(engine, "a", 1, small_state(9), upload_id="u1")
    assert first.accepted and not first.duplicate
    assert again.accepted and again.duplicate
    assert engine.open_round is not None and engine.open_round.received == 1
    with pytest.raises(AlreadyUploadedError):
        _upload(engine, "a", 1, small_state(9), upload_id="u2")


def test_late_upload_after_round_closed_is_rejected(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = make_engine(tmp_path, clock, min_clients=1, fraction=1.0)
    _register(engine, "a", "b")
    engine.tick()
    ticket = engine.uploads.begin("b", 1, "late", 10, {})
    assert isinstance(ticket, UploadTicket)
    _upload(engine, "a", 1, small_state(1))
    clock.advance(61)
    engine.tick()  # deadline: commits with a alone
    assert engine.run.last_committed_round == 1
    before = engine.global_state
    with pytest.raises(WrongRoundError, match="closed before the upload finished"):
        engine.uploads.complete(ticket, small_state(5))
    with pytest.raises(WrongRoundError, match="round 1 is closed"):
        engine.uploads.begin("b", 1, "later", 10, {})
    after = engine.global_state
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unknown_unselected_and_removed_clients(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = make_engine(tmp_path, clock, min_clients=1, fraction=0.1)
    _register(engine, "a", "b")
    engine.tick()
    opened = engine.open_round
    assert opened is not None and len(opened.selected) == 1
    other = "b" if opened.selected == ["a"] else "a"
    with pytest.raises(NotSelectedError):
        engine.uploads.begin(other, 1, "x", 5, {})
    with pytest.raises(UnknownClientError):
        engine.uploads.begin("ghost", 1, "x", 5, {})
    assert engine.heartbeat("ghost").action == ACTION_REGISTER
    assert engine.remove_client(other)
    assert engine.heartbeat(other).action == ACTION_REGISTER


def test_bad_registration_and_header_rejected(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, FakeClock(), min_clients=1)
    with pytest.raises(InvalidUpdateError, match="modality"):
        engine.register("a", 0, 10)
    with pytest.raises(InvalidUpdateError, match="must agree"):
        engine.register("a", BOTH, 10, num_paired=3, num_text_only=3)
    engine.register("a", IMAGE_ONLY, 10)
    engine.tick()
    with pytest.raises(InvalidUpdateError, match="exceeds"):
        engine.uploads.begin("a", 1, "u", 11, {})
    with pytest.raises(InvalidUpdateError, match="unknown module"):
        engine.uploads.begin("a", 1, "u", 10, {"nonsense": 3})


def test_restart_reopens_interrupted_round_without_double_counting(tmp_path: Path) -> None:
    clock = FakeClock()
    db = tmp_path / "state.db"
    engine = make_engine(tmp_path, clock, store=SqliteStateStore(db), total_rounds=2)
    _register(engine, "a", "b")
    engine.tick()
    for cid in "ab":
        _upload(engine, cid, 1, small_state(1))
    assert engine.run.last_committed_round == 1
    committed = engine.global_state
    engine.tick()  # opens round 2
    _upload(engine, "a", 2, small_state(2), upload_id="a-2")
    engine.store.close()  # "crash": the running sum of round 2 is lost

    clock.advance(5)
    engine2 = make_engine(tmp_path, clock, store=SqliteStateStore(db), total_rounds=2)
    assert engine2.run.last_committed_round == 1
    assert all(torch.equal(committed[k], engine2.global_state[k]) for k in committed)
    interrupted = [r for r in engine2.store.list_rounds() if r.round == 2]
    assert interrupted[0].state == "failed" and "restarted" in interrupted[0].message
    assert engine2.heartbeat("a").action == ACTION_WAIT or engine2.open_round is None
    engine2.heartbeat("b")
    opened = engine2.open_round
    assert opened is not None and (opened.round, opened.attempt) == (2, 2)
    # the same upload_id is NOT a duplicate in the re-opened attempt: it must be re-counted
    out = _upload(engine2, "a", 2, small_state(2), upload_id="a-2")
    assert out.accepted and not out.duplicate
    _upload(engine2, "b", 2, small_state(3))
    assert engine2.run.state == "completed"
    committed_rounds = [r.round for r in engine2.store.list_rounds() if r.state == "committed"]
    assert sorted(committed_rounds) == [1, 2]
    assert _committed(engine2, 2).received == 2


def test_pause_resume_stop(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = make_engine(tmp_path, clock, min_clients=1)
    _register(engine, "a")
    engine.pause("maintenance")
    assert engine.heartbeat("a").action == ACTION_WAIT
    assert engine.open_round is None
    engine.start()
    assert engine.heartbeat("a").action == ACTION_TRAIN
    engine.stop("enough")
    assert engine.heartbeat("a").action == ACTION_DONE
    assert engine.store.list_rounds()[0].state == "failed"
    kinds = [e.kind for e in engine.store.events_after(0)]
    assert kinds.index("run_paused") < kinds.index("round_started") < kinds.index("run_stopped")


def _retry_commits_round_1(engine: RoundEngine, clock: FakeClock) -> None:
    """Clients a and b come back; the next attempt of round 1 opens, both upload, it commits."""
    clock.advance(1)
    for cid in "ab":
        engine.heartbeat(cid)
    engine.tick()
    opened = engine.open_round
    assert opened is not None and opened.round == 1
    for cid in opened.selected:
        _upload(engine, cid, 1, small_state(5), upload_id=f"{cid}-retry")
    assert engine.run.state == "completed" and _committed(engine, 1).received == 2


class _CommitFailsOnce(InMemoryStateStore):
    """A store whose first commit_round fails like a full disk or a locked database."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    def commit_round(self, record: RoundRecord, run: RunRecord) -> None:
        if self.failures == 0:
            self.failures += 1
            raise StateStoreError("state database: database or disk is full")
        super().commit_round(record, run)


class _DatabaseDown(InMemoryStateStore):
    """A store that refuses every write (and round listing) while ``down`` is set; armed, it
    goes down right after storing the next upload row."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.armed = False
        self.refused = 0

    def add_upload(self, upload: UploadRecord) -> bool:
        self._refuse()
        stored = super().add_upload(upload)
        self.down, self.armed = self.down or self.armed, False
        return stored

    def _refuse(self) -> None:
        if self.down:
            self.refused += 1
            raise StateStoreError("state database: database is locked")

    def commit_round(self, record: RoundRecord, run: RunRecord) -> None:
        self._refuse()
        super().commit_round(record, run)

    def put_round(self, record: RoundRecord) -> None:
        self._refuse()
        super().put_round(record)

    def put_client(self, client: ClientRecord) -> None:
        self._refuse()
        super().put_client(client)

    def list_rounds(self) -> list[RoundRecord]:
        self._refuse()
        return super().list_rounds()

    def append_event(self, *args: Any, **kwargs: Any) -> EventRecord:
        self._refuse()
        return super().append_event(*args, **kwargs)


def test_a_database_that_stays_down_does_not_wedge_the_open_round(tmp_path: Path) -> None:
    clock = FakeClock()
    store = _DatabaseDown()
    engine = make_engine(tmp_path, clock, store=store, total_rounds=1)
    _register(engine, "a", "b")
    engine.tick()
    _upload(engine, "a", 1, small_state(5))
    store.armed = True
    # counted, then every write fails: progress, commit, failure record, events; none raises
    _upload(engine, "b", 1, small_state(5))
    assert store.refused >= 5
    assert engine.open_round is None
    assert engine.run.last_committed_round == 0
    assert all(c.state == "registered" for c in engine.clients())
    store.down = False
    _retry_commits_round_1(engine, clock)  # the database is back
    assert (store.get_run() or engine.run).last_committed_round == 1


class _RunWritesFail(InMemoryStateStore):
    """Refuses run updates once ``armed``."""

    armed = False

    def put_run(self, run: RunRecord) -> None:
        if self.armed:
            raise StateStoreError("state database: database or disk is full")
        super().put_run(run)


def test_a_policy_change_the_database_refuses_leaves_memory_unchanged(tmp_path: Path) -> None:
    store = _RunWritesFail()
    engine = make_engine(tmp_path, FakeClock(), store=store, total_rounds=3)
    before = engine.policy
    store.armed = True
    with pytest.raises(StateStoreError):
        engine.update_policy(replace(before, total_rounds=9, min_clients=5))
    assert engine.policy is before and engine.run.total_rounds == 3


def test_a_commit_the_database_refuses_is_undone_in_memory_and_retried(tmp_path: Path) -> None:
    clock = FakeClock()
    store = _CommitFailsOnce()
    engine = make_engine(tmp_path, clock, store=store, total_rounds=1)
    _register(engine, "a", "b")
    engine.tick()
    for cid in "ab":
        _upload(engine, cid, 1, small_state(5))
    assert store.failures == 1
    assert engine.run.last_committed_round == 0  # memory did not run ahead of the database
    assert (store.get_run() or engine.run).last_committed_round == 0
    failed = [r for r in store.list_rounds() if r.round == 1]
    assert [r.state for r in failed] == ["failed"] and "could not be recorded" in failed[0].message
    assert any(e.kind == "commit_failed" for e in store.events_after(0, 100))
    version, _ = engine.downloads.model_bytes(0)
    assert version == 0  # clients are still served the last committed model
    _retry_commits_round_1(engine, clock)
