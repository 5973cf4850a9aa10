"""The state the round engine's parts share under one re-entrant lock: the run record, the
attempt taking uploads, the attempt being committed, the global model, and the event log.

The engine (scheduling, lifecycle), the upload intake, the projection intake, the model
downloads and the commit pipeline each read and move this board; none of them calls another
to reach it. Heavy work (validation, aggregation, fsync) is done outside ``lock``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from crossfed.server.errors import RunNotActiveError, StateStoreError, WrongRoundError
from crossfed.server.round_attempt import Attempt, Closing
from crossfed.server.round_policy import RoundPolicy
from crossfed.server.state.base import StateStore
from crossfed.server.state.records import TERMINAL_RUN_STATES, EventRecord, RunRecord

Clock = Callable[[], float]
log = logging.getLogger(__name__)


@dataclass
class EventLog:
    """Appends events to the store and wakes whoever waits on ``changed`` (admin watch,
    metrics)."""

    store: StateStore
    clock: Clock
    lock: threading.RLock

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def append(
        self,
        kind: str,
        round_no: int = 0,
        client_id: str = "",
        message: str = "",
        values: dict[str, float] | None = None,
    ) -> EventRecord:
        """Record one event (raises `StateStoreError` when the database refuses it)."""
        with self.lock:
            event = self.store.append_event(
                kind, self.clock(), round_no, client_id, message, values
            )
            self.changed.notify_all()
            return event

    def best_effort(self, what: str, write: Callable[..., object], *args: object) -> bool:
        """Run a state write on a failure path; log (not raise) if the database refuses it."""
        try:
            write(*args)
        except StateStoreError as exc:
            log.error("could not record the %s: %s", what, exc)
            return False
        return True


@dataclass
class RoundBoard:
    """The run, its open and closing attempts and the global model (guard: ``lock``)."""

    store: StateStore
    events: EventLog
    run: RunRecord
    global_model: dict[str, torch.Tensor]
    policy: RoundPolicy  # swapped whole by the admin's live config
    epsilon_budget: float  # per-client projection-DP budget, 0: none (live config too)
    open: Attempt | None = None
    closing: Closing | None = None
    global_bytes: bytes | None = None  # serialized latest model, cached for downloads
    idle: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.idle = threading.Condition(self.lock)

    @property
    def lock(self) -> threading.RLock:
        """The one lock every part takes (the event log's)."""
        return self.events.lock

    @property
    def clock(self) -> Clock:
        """The injected clock."""
        return self.events.clock

    def require_active(self) -> None:
        """Raise unless the run still accepts work."""
        if self.run.state in TERMINAL_RUN_STATES:
            raise RunNotActiveError(f"the run is {self.run.state}; nothing more is accepted")

    def require_open(self, round_no: int) -> Attempt:
        """The open attempt of ``round_no``, or an error saying why there is none."""
        self.require_active()
        opened = self.open
        last = self.run.last_committed_round
        closing = self.closing
        if opened is None and closing is not None and closing.attempt.record.round == round_no:
            raise WrongRoundError(f"round {round_no} is closed (its commit is running)")
        if opened is None:
            state = "closed" if round_no <= last else "not open yet"
            raise WrongRoundError(
                f"round {round_no} is {state} (no round is open; last committed round is {last})"
            )
        if round_no != opened.record.round:
            when = "closed" if round_no < opened.record.round else "not started"
            raise WrongRoundError(
                f"round {round_no} is {when}; the open round is {opened.record.round}"
            )
        return opened
