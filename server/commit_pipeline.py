"""A closed attempt's commit, from the aggregate to the recorded round. Runs on the committer
thread: the heavy half (aggregate, strategy step, validation, fsynced checkpoint;
server/round_commit.py) without the board's lock, so heartbeats and registrations never wait
for it; then, under the lock, the prototypes are published and the commit is recorded in the
database before memory moves on. Any failure fails the attempt (retried, bounded) and restores
the strategy's state of the last committed round.
"""

from __future__ import annotations

import logging
import time

import torch
from crossfed.server.client_registry import ClientRegistry
from crossfed.server.errors import StateStoreError
from crossfed.server.model_bundles import BundleStore
from crossfed.server.projection_desk import ProjectionDesk
from crossfed.server.round_attempt import Attempt, Closing
from crossfed.server.round_board import RoundBoard
from crossfed.server.round_commit import RoundCommitter
from crossfed.server.run_lifecycle import RunLifecycle
from crossfed.server.state.records import (
    ROUND_COMMITTED,
    ROUND_FAILED,
    RUN_FAILED,
    TERMINAL_RUN_STATES,
)
from crossfed.server.strategies.base import Strategy
from crossfed.server.strategies.central_dp import CentralDPStrategy

log = logging.getLogger(__name__)


class CommitPipeline:
    """Commits the board's closing attempt; it never leaves the board stuck in 'closing'."""

    def __init__(
        self,
        board: RoundBoard,
        lifecycle: RunLifecycle,
        registry: ClientRegistry,
        committer: RoundCommitter,
        projections: ProjectionDesk,
        strategy: Strategy,
        bundles: BundleStore | None,
        central_dp_delta: float,
    ) -> None:
        self.board = board
        self.lifecycle = lifecycle
        self.registry = registry
        self.committer = committer
        self.projections = projections
        self.strategy = strategy
        self.bundles = bundles
        self.central_dp_delta = central_dp_delta

    def run(self) -> None:
        """Commit the closing attempt (if any), then clear it and wake `wait_idle`."""
        board = self.board
        with board.lock:
            closing = board.closing
        if closing is None:
            return
        try:
            self._commit(closing)
        except Exception as exc:  # a bug must fail the attempt, not wedge the run
            log.exception("commit of round %d failed", closing.attempt.record.round)
            with board.lock:
                state = closing.attempt.record.state
                try:
                    if state not in (ROUND_COMMITTED, ROUND_FAILED):
                        self.lifecycle.fail_attempt(
                            closing.attempt, f"commit failed: {exc}; the round is re-run", True
                        )
                finally:  # even if recording the failure raised (database down)
                    if state != ROUND_COMMITTED:
                        self.rollback_strategy()
        finally:
            with board.lock:
                board.closing = None
                board.idle.notify_all()

    def _commit(self, closing: Closing) -> None:
        """Prepare outside the lock; then, under it, publish and record atomically."""
        board = self.board
        attempt = closing.attempt
        record = attempt.record
        started = time.perf_counter()
        prepared, reason = attempt.prepare(
            self.committer, board.global_model, board.run.run_id, closing.reason
        )
        if prepared.refused:
            with board.lock:
                self._refuse(attempt, prepared.refused, prepared.message)
            return
        new_state = prepared.state
        with board.lock:
            if not self._record(attempt, reason, new_state):
                self.rollback_strategy()
                return
            values = {
                "received": float(record.received),
                "num_samples": float(record.num_samples),
                "aggregate_s": time.perf_counter() - started,
                **record.metrics,
                **prepared.values,
                **self._privacy_values(attempt),
            }
            # the commit is recorded: a refused event must not skip completion and pruning
            board.events.best_effort(
                "round_committed event",
                lambda: board.events.append(
                    "round_committed", round_no=record.round, message=reason, values=values
                ),
            )
            log.info(
                "round %d committed: %d upload(s), %d samples, %.1f s, epsilon %.2f so far%s",
                record.round,
                record.received,
                record.num_samples,
                record.ended_unix_s - record.started_unix_s,
                board.run.epsilon_spent,
                " (calibration)" if attempt.is_calibration else "",
            )
            done = f"all {board.run.total_rounds} rounds committed"
            self.lifecycle.complete_if_final(
                f"{done}; calibration: {reason}" if attempt.is_calibration else done
            )
        self.committer.after_commit(
            record.round,
            new_state,
            self.bundles,
            lambda message: board.events.best_effort(
                "bundle_failed event",
                lambda: board.events.append(
                    "bundle_failed", round_no=record.round, message=message
                ),
            ),
        )

    def _privacy_values(self, attempt: Attempt) -> dict[str, float]:
        """Central DP's epsilon so far, for the commit event (training rounds only)."""
        if attempt.is_calibration or not isinstance(self.strategy, CentralDPStrategy):
            return {}
        return self.strategy.epsilon_values(self.central_dp_delta)

    def _record(self, attempt: Attempt, reason: str, new_state: dict[str, torch.Tensor]) -> bool:
        """Publish the pending prototypes, record the commit in the database, then move
        memory on; False (the attempt failed, to be retried) when the disk or the database
        refuses."""
        board = self.board
        record = attempt.record
        if attempt.is_calibration != self.lifecycle.is_calibration_round(record.round):
            # rounds changed (update_policy) while this commit ran outside the lock: the
            # round is now of the other kind; dropped uncounted like an open one would be
            record.counts_as_retry = False
            self.lifecycle.fail_attempt(
                attempt,
                f"rounds changed to {board.run.total_rounds} while round {record.round} "
                f"was being committed; it is re-run as a "
                f"{'training' if attempt.is_calibration else 'calibration'} round",
                retry=False,
            )
            return False
        published: tuple[int, bytes] | None = None
        try:  # late projections of the last training round stay unpublished at calibration
            if not attempt.is_calibration:
                published = self.projections.publish(record.round, self.committer.checkpoints)
        except OSError as exc:
            self._refuse(
                attempt,
                "checkpoint_failed",
                f"checkpoint of round {record.round} could not be written "
                f"({exc.strerror or exc}); the round is not committed, the last good "
                "checkpoint is kept",
            )
            return False
        if not self._record_in_database(attempt, reason):
            return False
        if published is not None:
            self.projections.adopt(published)
        board.global_model = new_state
        board.global_bytes = None
        for cid in attempt.uploaders:
            client = self.registry.records[cid]
            client.rounds_completed += 0 if attempt.is_calibration else 1
            client.last_round = record.round
        self.registry.release(record.selected)
        for cid in attempt.uploaders:
            self.registry.save(self.registry.records[cid])
        return True

    def _record_in_database(self, attempt: Attempt, reason: str) -> bool:
        """Mark the round committed in the database; memory is undone if it refuses (it must
        not run ahead of the database: a restart reads the last round the database holds)."""
        board = self.board
        record = attempt.record
        before = (record.state, record.ended_unix_s, record.message, record.metrics)
        last_before = board.run.last_committed_round
        record.state = ROUND_COMMITTED
        record.ended_unix_s = board.clock()
        record.message = reason
        record.metrics = attempt.mean_metrics()
        board.run.last_committed_round = record.round
        try:
            board.store.commit_round(record, board.run)
        except Exception as exc:
            record.state, record.ended_unix_s, record.message, record.metrics = before
            board.run.last_committed_round = last_before
            if not isinstance(exc, StateStoreError):
                raise  # a bug: `run` fails the attempt (its record is not committed)
            message = f"round {record.round} could not be recorded ({exc}); not committed"
            log.error(message)
            board.events.best_effort(
                "commit_failed event",
                lambda: board.events.append(
                    "commit_failed", round_no=record.round, message=message
                ),
            )
            self.lifecycle.fail_attempt(attempt, message, retry=True)
            return False
        return True

    def rollback_strategy(self) -> None:
        """Restore the strategy's state of the last committed round after a failed commit
        (its step on the failed aggregate must not count). If that state cannot be read, the
        run fails: training on would step the optimizer twice on one round."""
        last = self.board.run.last_committed_round
        try:
            self.committer.load_state(last)
        except Exception as exc:
            log.exception("could not restore the strategy state of round %d", last)
            if self.board.run.state not in TERMINAL_RUN_STATES:
                self.board.events.best_effort(
                    "run failure",
                    self.lifecycle.set_state,
                    RUN_FAILED,
                    f"the strategy state of round {last} could not be restored after a "
                    f"failed commit ({exc}); fix or remove it and restart the server",
                )

    def _refuse(self, attempt: Attempt, kind: str, message: str) -> None:
        """The round's new model is unusable or could not be written: the attempt fails (and
        is retried, bounded by max_round_attempts); the last good model stays, and so does
        the strategy's state of the last committed round."""
        self.rollback_strategy()
        log.error(message)
        self.board.events.best_effort(
            f"{kind} event",
            lambda: self.board.events.append(kind, round_no=attempt.record.round, message=message),
        )
        self.lifecycle.fail_attempt(attempt, message, retry=True)
