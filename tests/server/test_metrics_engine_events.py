"""ServerMetrics fed by the round engine's event log (fake clock, no network): counters and
histograms move exactly with commits, failures and uploads; gauges read engine state at
scrape time; events from before the metrics existed are not recounted."""

from __future__ import annotations

from pathlib import Path

import torch
from crossfed.server.metrics import ServerMetrics
from crossfed.server.round_engine import RoundEngine
from crossfed.server.round_uploads import UploadTicket
from prometheus_client import generate_latest

from tests.support.engine_fixtures import BOTH, FakeClock, make_engine, small_state


def _value(metrics: ServerMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def _upload(engine: RoundEngine, cid: str, round_no: int, state: dict[str, torch.Tensor]) -> None:
    ticket = engine.uploads.begin(cid, round_no, f"{cid}-{round_no}", 10, {})
    assert isinstance(ticket, UploadTicket)
    engine.uploads.complete(ticket, state)


def test_commit_and_failure_move_the_counters(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = make_engine(tmp_path, clock, total_rounds=3, min_clients=2)
    metrics = ServerMetrics(engine)  # after the engine's startup events
    assert metrics.poll_events() == 0
    for cid in ("a", "b"):
        engine.register(cid, BOTH, 10)
    engine.heartbeat("a")
    opened = engine.open_round
    assert opened is not None and opened.round == 1
    clock.advance(4.0)
    for cid in ("a", "b"):
        _upload(engine, cid, 1, small_state(1))
    assert metrics.poll_events() > 0
    assert _value(metrics, "crossfed_rounds_committed_total") == 1
    assert _value(metrics, "crossfed_uploads_accepted_total") == 2
    assert _value(metrics, "crossfed_aggregation_seconds_count") == 1
    assert _value(metrics, "crossfed_upload_fold_seconds_count") == 2
    assert _value(metrics, "crossfed_round_duration_seconds_count", outcome="committed") == 1
    assert _value(metrics, "crossfed_round_duration_seconds_sum", outcome="committed") == 4.0
    assert _value(metrics, "crossfed_events_total", kind="client_registered") == 2

    # round 2: only one upload before the deadline -> failed attempt
    engine.heartbeat("a")
    engine.heartbeat("b")
    assert engine.open_round is not None and engine.open_round.round == 2
    _upload(engine, "a", 2, small_state(2))
    clock.advance(61.0)
    engine.tick()
    metrics.poll_events()
    assert _value(metrics, "crossfed_rounds_failed_total") == 1
    assert _value(metrics, "crossfed_round_duration_seconds_count", outcome="failed") == 1
    assert _value(metrics, "crossfed_rounds_committed_total") == 1  # unchanged


def test_gauges_read_engine_state_at_scrape(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = make_engine(tmp_path, clock, min_clients=2)
    metrics = ServerMetrics(engine)
    engine.epsilon_budget = 8.0
    assert _value(metrics, "crossfed_clients", state="registered") == 0
    for cid in ("a", "b", "c"):
        engine.register(cid, BOTH, 10)
    engine.remove_client("c")
    assert _value(metrics, "crossfed_clients", state="registered") == 2
    assert _value(metrics, "crossfed_clients", state="removed") == 1
    engine.heartbeat("a")
    assert _value(metrics, "crossfed_clients", state="selected") == 2
    assert _value(metrics, "crossfed_current_round") == 1
    assert _value(metrics, "crossfed_run_state", state="running") == 1
    assert _value(metrics, "crossfed_run_state", state="paused") == 0
    assert _value(metrics, "crossfed_epsilon_budget") == 8.0
    engine.pause()
    assert _value(metrics, "crossfed_run_state", state="paused") == 1
    text = generate_latest(metrics.registry).decode()
    assert 'crossfed_clients{state="removed"} 1.0' in text  # the exposition format


def test_old_events_are_not_recounted(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = make_engine(tmp_path, clock, min_clients=1, total_rounds=2)
    engine.register("a", BOTH, 10)
    engine.heartbeat("a")
    _upload(engine, "a", 1, small_state(1))
    assert engine.run.last_committed_round == 1
    metrics = ServerMetrics(engine)  # e.g. a restarted server over an existing event log
    metrics.poll_events()
    assert _value(metrics, "crossfed_rounds_committed_total") == 0
    assert _value(metrics, "crossfed_last_committed_round") == 1
