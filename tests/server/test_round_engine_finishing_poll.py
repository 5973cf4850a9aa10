"""A client whose update is in polls faster while the round finishes (so the next round is
noticed within ~0.1 s, not a whole heartbeat interval), with the fleet's rate bounded."""

from __future__ import annotations

from pathlib import Path

from crossfed.server.round_attempt import ACTION_TRAIN, ACTION_WAIT
from crossfed.server.round_engine import RoundEngine
from crossfed.server.round_uploads import UploadTicket

from tests.support.engine_fixtures import BOTH, FakeClock, make_engine, small_state


def _upload(engine: RoundEngine, cid: str) -> None:
    ticket = engine.uploads.begin(cid, 1, f"{cid}-1", 10, {})
    assert isinstance(ticket, UploadTicket)
    engine.uploads.complete(ticket, small_state(1))


def test_uploaded_client_polls_faster_than_waiting_ones(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, FakeClock(), min_clients=3, poll_after_ms=1000)
    for cid in ("a", "b", "c"):
        engine.register(cid, BOTH, 10)
    assert engine.heartbeat("a").action == ACTION_TRAIN
    _upload(engine, "a")
    done = engine.heartbeat("a")
    assert done.action == ACTION_WAIT
    assert done.poll_after_ms == 100  # one uploader: the floor
    assert engine.heartbeat("b").action == ACTION_TRAIN  # not uploaded yet: still TRAIN


def test_finishing_poll_rate_is_bounded_and_never_slower_than_base(tmp_path: Path) -> None:
    clients = [f"c{i:02d}" for i in range(40)]
    engine = make_engine(tmp_path, FakeClock(), min_clients=40, poll_after_ms=300)
    for cid in clients:
        engine.register(cid, BOTH, 10)
    assert engine.heartbeat(clients[0]).action == ACTION_TRAIN
    polls = []
    for cid in clients[:-1]:
        _upload(engine, cid)
        polls.append(engine.heartbeat(cid).poll_after_ms)
    # 100 polls/s across the uploaders: n uploaders wait n*10 ms, capped at the base interval
    assert polls[0] == 100
    assert polls[19] == 200
    assert polls[-1] == 300
    assert polls == sorted(polls)
