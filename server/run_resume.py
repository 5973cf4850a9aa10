"""Starting or resuming a run from the state store: the run record (created with the
initial checkpoint on first start) and the rounds a killed process left open, which are
failed uncounted and re-run (their uploads lived only in the lost running sum)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping

import torch
from crossfed.server.checkpoints import CheckpointStore
from crossfed.server.round_policy import RoundPolicy
from crossfed.server.state.base import StateStore
from crossfed.server.state.records import (
    ROUND_COMMITTED,
    ROUND_FAILED,
    RUN_IDLE,
    RUN_RUNNING,
    RunRecord,
)

#: event(kind, round_no, message) as the engine logs it
EventSink = Callable[[str, int, str], object]


def load_or_create_run(
    store: StateStore,
    checkpoints: CheckpointStore,
    policy: RoundPolicy,
    initial_state: Mapping[str, torch.Tensor],
    now: float,
    event: EventSink,
) -> RunRecord:
    """The stored run, or a new one (checkpoint 0 = ``initial_state``) when there is none."""
    run = store.get_run()
    if run is not None:
        last = run.last_committed_round
        event("run_resumed", last, f"resumed at last committed round {last}")
        return run
    run = RunRecord(
        run_id=uuid.uuid4().hex[:12],
        state=RUN_RUNNING if policy.auto_start else RUN_IDLE,
        total_rounds=policy.total_rounds,
        created_unix_s=now,
    )
    checkpoints.save(0, dict(initial_state), run.run_id)
    store.put_run(run)
    event("run_created", 0, f"run {run.run_id}, {run.total_rounds} rounds")
    if run.state == RUN_RUNNING:
        event("run_started", 0, "")
    return run


def fail_interrupted_rounds(store: StateStore, now: float, event: EventSink) -> None:
    """Every round attempt still open in the store is failed, not counted as a retry."""
    for rec in store.list_rounds():
        if rec.state in (ROUND_COMMITTED, ROUND_FAILED):
            continue
        rec.state = ROUND_FAILED
        rec.ended_unix_s = now
        rec.counts_as_retry = False
        rec.message = "server restarted while the round was open; the round is re-run"
        store.put_round(rec)
        event("round_interrupted", rec.round, rec.message)
