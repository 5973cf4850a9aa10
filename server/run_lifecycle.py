"""The run's life: idle -> running <-> paused -> completed / failed / stopped, and what a failed
round attempt does to it (retried as a new attempt of the same round from the same input model,
until ``max_round_attempts``; a calibration round that keeps failing is skipped). Shared by the
engine's scheduler and the commit pipeline; every method runs under the board's lock.
"""

from __future__ import annotations

import logging

from crossfed.server.client_registry import ClientRegistry
from crossfed.server.errors import RunNotActiveError, StateStoreError
from crossfed.server.round_attempt import Attempt
from crossfed.server.round_board import RoundBoard
from crossfed.server.state.records import (
    ROUND_FAILED,
    RUN_COMPLETED,
    RUN_FAILED,
    RUN_PAUSED,
    RUN_RUNNING,
    TERMINAL_RUN_STATES,
    RoundRecord,
    RunRecord,
)

log = logging.getLogger(__name__)


class RunLifecycle:
    """Run-state transitions and round-attempt failure bookkeeping on the board."""

    def __init__(self, board: RoundBoard, registry: ClientRegistry, calibrates: bool) -> None:
        self.board = board
        self.registry = registry
        self.calibrates = calibrates
        self.waiting_since: float | None = None  # since when too few clients were online

    # ------------------------------------------------------------------ round numbers
    def next_round(self) -> int:
        """The round the next attempt runs."""
        return self.board.run.last_committed_round + 1

    def final_round(self) -> int:
        """The round whose commit completes the run: the last training round, or the
        calibration round after it."""
        return self.board.run.total_rounds + (1 if self.calibrates else 0)

    def is_calibration_round(self, round_no: int) -> bool:
        """Whether ``round_no`` is the run's calibration round (none without calibration)."""
        return self.calibrates and round_no == self.board.run.total_rounds + 1

    def next_attempt(self, round_no: int) -> int:
        """The attempt number a new attempt of ``round_no`` gets."""
        rounds = self.board.store.list_rounds()
        return 1 + max((r.attempt for r in rounds if r.round == round_no), default=0)

    # ------------------------------------------------------------------ run state
    def snapshot(self) -> RunRecord:
        """A copy of the run record."""
        return RunRecord(**vars(self.board.run))

    def set_state(self, state: str, message: str) -> None:
        """Move the run to ``state`` (database first, then memory, then the event)."""
        run = self.board.run
        run.state = state
        run.message = message
        self.board.store.put_run(run)
        self.waiting_since = None
        self.board.events.append(f"run_{state}", round_no=run.last_committed_round, message=message)

    def start(self) -> RunRecord:
        """Start an idle run (or resume a paused one)."""
        run = self.board.run
        if run.state in TERMINAL_RUN_STATES:
            raise RunNotActiveError(f"run {run.run_id} is {run.state}; start a new one")
        if run.state != RUN_RUNNING:
            self.set_state(RUN_RUNNING, "started")
        return self.snapshot()

    def pause(self, reason: str) -> RunRecord:
        """No new rounds start; an open round runs to its end."""
        if self.board.run.state != RUN_RUNNING:
            raise RunNotActiveError(f"run is {self.board.run.state}, only a running run can pause")
        self.set_state(RUN_PAUSED, reason or "paused")
        return self.snapshot()

    def resume(self, reason: str) -> RunRecord:
        """Resume a paused run (only a paused one: anything else is a precondition error)."""
        if self.board.run.state != RUN_PAUSED:
            raise RunNotActiveError(f"run is {self.board.run.state}, only a paused run can resume")
        self.set_state(RUN_RUNNING, reason or "resumed")
        return self.snapshot()

    def complete_if_final(self, message: str) -> None:
        """Complete the run once its final round is committed (an ended run stays ended)."""
        run = self.board.run
        if run.last_committed_round >= self.final_round() and run.state not in TERMINAL_RUN_STATES:
            self.set_state(RUN_COMPLETED, message)

    def skip_calibration(self, why: str) -> None:
        """Complete with the last training round's model, uncalibrated."""
        self.set_state(
            RUN_COMPLETED,
            f"all {self.board.run.total_rounds} rounds committed; calibration skipped: {why}",
        )

    # ------------------------------------------------------------------ failures
    def fail_attempt(self, attempt: Attempt, message: str, retry: bool) -> None:
        """End an attempt as failed. Memory moves on even when the database refuses the
        record (full disk, lock): a restart would find the attempt still open and re-run it as
        interrupted, the same outcome, so a failing database never wedges the open round."""
        events = self.board.events
        record = attempt.record
        record.state = ROUND_FAILED
        record.ended_unix_s = self.board.clock()
        record.message = message
        events.best_effort(f"failure of round {record.round}", self.board.store.put_round, record)
        self.registry.release(record.selected)
        events.best_effort(
            "round_failed event",
            lambda: events.append("round_failed", round_no=record.round, message=message),
        )
        if retry:
            self.after_failure(record.round, message)

    def record_start_failure(self, available: int, min_clients: int, timeout_s: float) -> None:
        """Too few clients came online in time: a failed attempt of the next round."""
        now = self.board.clock()
        round_no = self.next_round()
        record = RoundRecord(
            round=round_no,
            attempt=self.next_attempt(round_no),
            state=ROUND_FAILED,
            started_unix_s=self.waiting_since or now,
            deadline_unix_s=now,
            ended_unix_s=now,
            message=(
                f"only {available} client(s) online after {timeout_s:g} s; "
                f"min_clients is {min_clients}"
            ),
        )
        self.board.store.put_round(record)
        self.board.events.append("round_failed", round_no=round_no, message=record.message)
        self.after_failure(round_no, record.message)

    def after_failure(self, round_no: int, message: str) -> None:
        """Retry the round (new attempt) or end the run when attempts are used up. Attempts
        the database could not record do not count: they are retried like interrupted ones.
        A run that ended meanwhile (stopped while the attempt's commit ran outside the lock)
        keeps its state: the operator's stop is not overwritten by 'failed' or 'completed'."""
        if self.board.run.state in TERMINAL_RUN_STATES:
            return
        try:
            attempts = [r for r in self.board.store.list_rounds() if r.round == round_no]
        except StateStoreError as exc:
            log.error("could not read the attempts of round %d: %s", round_no, exc)
            attempts = []
        failures = sum(1 for r in attempts if r.state == ROUND_FAILED and r.counts_as_retry)
        max_attempts = self.board.policy.max_round_attempts
        if failures >= max_attempts and self.is_calibration_round(round_no):
            self.skip_calibration(f"it failed {failures} time(s); last reason: {message}")
        elif failures >= max_attempts:
            self.set_state(
                RUN_FAILED,
                f"round {round_no} failed {failures} time(s) (max_round_attempts="
                f"{max_attempts}); last reason: {message}",
            )
        else:
            self.waiting_since = self.board.clock()
