"""An upload's way into a round: `begin` checks the header against the open attempt and
issues a ticket; `complete` validates the decoded tensors (outside the lock), measures them
against the update bound, then folds them into the attempt and records the upload. The
transport side (chunks, decryption, digests) is server/upload_receiver.py; the commit is the
engine's once the attempt closes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from crossfed.server.client_registry import ClientRegistry
from crossfed.server.errors import (
    AlreadyUploadedError,
    InvalidUpdateError,
    NotSelectedError,
    PrivacyBudgetExceededError,
    PrivacyMandateError,
    WrongRoundError,
)
from crossfed.server.round_attempt import Attempt
from crossfed.server.round_board import RoundBoard
from crossfed.server.sd_admission import check_sd_weight
from crossfed.server.state.records import CLIENT_UPLOADED, UploadRecord
from crossfed.server.update_bound import BoundCheck, UpdateBound
from crossfed.server.update_validation import TensorSlot, validate_update


@dataclass(frozen=True)
class UploadTicket:
    """Permission to stream an update into one round attempt (issued before the payload)."""

    client_id: str
    upload_id: str
    round: int
    attempt: int
    num_samples: int
    module_samples: dict[str, int]
    weights: dict[str, float]
    spec: Mapping[str, TensorSlot]
    calibration: bool = False  # statistics for the calibration round, not weights
    required: frozenset[str] | None = None  # keys it must carry (None: all of spec)
    target: Attempt | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class UploadOutcome:
    """Result of an upload: accepted (counted once), or a duplicate of an earlier one."""

    accepted: bool
    duplicate: bool
    message: str
    round_closed: bool = False


class RoundUploads:
    """Admits uploads into the board's open attempt; ``on_counted`` (the engine's tick) runs
    after each counted one, so the attempt closes as soon as it has what it needs."""

    def __init__(
        self,
        board: RoundBoard,
        registry: ClientRegistry,
        spec: Mapping[str, TensorSlot],
        module_of: Callable[[str], str],
        update_bound: UpdateBound | None,
        on_counted: Callable[[], None],
        min_clients: Callable[[], int],
    ) -> None:
        self.board = board
        self.registry = registry
        self.spec = spec
        self.module_of = module_of
        self.update_bound = update_bound
        self.on_counted = on_counted
        self.min_clients = min_clients

    def begin(
        self,
        client_id: str,
        round_no: int,
        upload_id: str,
        num_samples: int,
        module_samples: Mapping[str, int],
    ) -> UploadTicket | UploadOutcome:
        """Check an upload header; returns a ticket, or a duplicate outcome (nothing to do)."""
        if not upload_id:
            raise InvalidUpdateError("upload header has an empty upload_id (idempotency key)")
        board = self.board
        with board.lock:
            client = self.registry.known(client_id)
            self.registry.touch(client, board.clock())
            opened = board.require_open(round_no)
            record = opened.record
            if opened.uploaders.get(client_id) == upload_id or board.store.get_upload(
                record.round, record.attempt, client_id, upload_id
            ):
                return UploadOutcome(
                    accepted=True,
                    duplicate=True,
                    message=f"upload {upload_id} was already counted in round {record.round}",
                )
            if client_id not in record.selected:
                raise NotSelectedError(
                    f"client {client_id!r} was not selected for round {record.round}"
                )
            if client_id in opened.uploaders:
                raise AlreadyUploadedError(
                    f"client {client_id!r} already uploaded round {record.round} as "
                    f"{opened.uploaders[client_id]!r}; a retry must reuse that upload_id"
                )
            if num_samples > client.num_samples:
                raise InvalidUpdateError(
                    f"num_samples={num_samples} exceeds the {client.num_samples} samples this "
                    "client registered"
                )
            terms = opened.upload_terms(num_samples, module_samples, self.spec, self.module_of)
            check_sd_weight(client_id, self.registry.recovery_of.get(client_id), terms.weights)
            return UploadTicket(
                client_id=client_id,
                upload_id=upload_id,
                round=record.round,
                attempt=record.attempt,
                num_samples=num_samples,
                module_samples=dict(module_samples),
                weights=terms.weights,
                spec=terms.spec,
                calibration=opened.is_calibration,
                required=terms.required,
                target=opened,
            )

    def complete(
        self,
        ticket: UploadTicket,
        tensors: Mapping[str, torch.Tensor],
        payload_sha256: str = "",
        metrics: Mapping[str, float] | None = None,
    ) -> UploadOutcome:
        """Validate the decoded update fully, then (and only then) fold it into the attempt."""
        board = self.board
        target = ticket.target
        try:
            validate_update(tensors, ticket.spec, required=ticket.required)
            if target is not None:
                target.check_upload(ticket.client_id, tensors, ticket.num_samples, metrics or {})
        except (InvalidUpdateError, PrivacyBudgetExceededError, PrivacyMandateError) as exc:
            board.events.append("upload_rejected", ticket.round, ticket.client_id, str(exc))
            raise
        # one pass over the update, outside the lock
        bound = target.bound_check(tensors, ticket.weights) if target is not None else None
        with board.lock:
            opened = board.open
            if opened is None or target is None or opened is not target:
                raise WrongRoundError(
                    f"round {ticket.round} (attempt {ticket.attempt}) closed before the upload "
                    "finished; the update was not counted"
                )
            if ticket.client_id in opened.uploaders:
                if opened.uploaders[ticket.client_id] == ticket.upload_id:
                    return UploadOutcome(True, True, f"upload {ticket.upload_id} already counted")
                raise AlreadyUploadedError(
                    f"client {ticket.client_id!r} already uploaded round {ticket.round}"
                )
            # Fold first: an aggregator may refuse the update (a buffering strategy over its
            # memory budget); then nothing is recorded and a retry is not told "counted".
            # Within the open attempt the uploaders map is what dedups (a restart fails the
            # attempt), so the upload row is written after, best effort like the rest.
            fold_started = time.perf_counter()
            opened.fold(tensors, ticket.weights, ticket.num_samples, bound, ticket.client_id)
            fold_s = time.perf_counter() - fold_started
            opened.uploaders[ticket.client_id] = ticket.upload_id
            self._record(opened, ticket, payload_sha256, metrics or {}, bound, fold_s)
        self.on_counted()
        with board.lock:
            closed = board.open is not opened
        return UploadOutcome(
            True, False, f"update for round {ticket.round} accepted", round_closed=closed
        )

    def _record(
        self,
        opened: Attempt,
        ticket: UploadTicket,
        payload_sha256: str,
        metrics: Mapping[str, float],
        bound: BoundCheck | None,
        fold_s: float,
    ) -> None:
        """Store what a counted upload changed. The update is counted (the sum holds it):
        these records are best effort, the commit writes the round record again."""
        board = self.board
        events = board.events
        now = board.clock()
        upload = UploadRecord(
            upload_id=ticket.upload_id,
            client_id=ticket.client_id,
            round=ticket.round,
            attempt=ticket.attempt,
            num_samples=ticket.num_samples,
            received_unix_s=now,
            payload_sha256=payload_sha256,
            module_samples=ticket.module_samples,
            metrics=dict(metrics),
        )
        events.best_effort(f"upload row of {ticket.client_id}", board.store.add_upload, upload)
        opened.add_metrics(metrics, ticket.num_samples)
        record = opened.record
        record.received = len(opened.uploaders)
        record.num_samples += ticket.num_samples
        client = self.registry.records[ticket.client_id]
        client.state = CLIENT_UPLOADED
        if opened.min_reached_at is None and record.received >= opened.min_uploads(
            self.min_clients()
        ):
            opened.min_reached_at = now
        events.best_effort(f"progress of round {record.round}", board.store.put_round, record)
        events.best_effort(f"upload of {client.client_id}", self.registry.save, client)
        values = {"num_samples": float(ticket.num_samples), "fold_s": fold_s}
        if bound is not None:
            values["update_norm_ratio"] = bound.ratio
            if bound.clipped:
                events.best_effort(
                    "update_clipped event",
                    events.append,
                    "update_clipped",
                    ticket.round,
                    ticket.client_id,
                    self._clipped_message(ticket, bound),
                    {"distance": bound.distance, "limit": bound.limit, "scale": bound.scale},
                )
        events.best_effort(
            "upload_accepted event",
            events.append,
            "upload_accepted",
            ticket.round,
            ticket.client_id,
            f"upload {ticket.upload_id}",
            values,
        )

    def _clipped_message(self, ticket: UploadTicket, bound: BoundCheck) -> str:
        ratio = self.update_bound.max_norm_ratio if self.update_bound else 0
        return (
            f"update {ticket.upload_id} lies {bound.distance:.4g} from the global model, past "
            f"the bound {bound.limit:.4g} (update_bound.max_norm_ratio {ratio:g} x its norm "
            f"{bound.reference:.4g}); folded in scaled by {bound.scale:.3g}"
        )

    def record_rejection(self, client_id: str, round_no: int, message: str) -> None:
        """Log a rejected upload (transport-level problems found by the servicer)."""
        self.board.events.append("upload_rejected", round_no, client_id, message)
