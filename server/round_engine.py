"""The round engine: registration, heartbeats / next action, selection, deadlines, straggler
cut-off, failure + retry, streaming aggregation (eq. 15), projection exchange (eq. 16),
checkpoints and resume. Plain Python, no network: the gRPC servicer is a thin shell on top.

With a `CalibrationStep`, round total_rounds+1 is a calibration round (server/calibration_round.py):
clients holding images send feature statistics instead of weights, the server fits the
image-only last layers once, and that commit completes the run.

Round r trains from the global model of round r-1 (round 0 = the initial model). A failed or
interrupted attempt of round r is retried as a new attempt of the same round, from the same
input model, so no round is ever counted twice.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from crossfed.common.privacy.projection_dp import ProjectionDPParams
from crossfed.common.wire.errors import WireError
from crossfed.common.wire.tensor_codec import decode_tensors
from crossfed.server.aggregation import ModuleOf, module_weights_of
from crossfed.server.calibration_round import CalibrationStep, StatsSum, calibrated_model
from crossfed.server.checkpoints import CheckpointStore
from crossfed.server.client_registry import ClientRegistry
from crossfed.server.errors import (
    AlreadyUploadedError,
    CheckpointError,
    ConfigurationError,
    FederationMismatchError,
    InvalidUpdateError,
    ModelMismatchError,
    NotSelectedError,
    PrivacyBudgetExceededError,
    PrivacyMandateError,
    RunNotActiveError,
    ServerError,
    StateStoreError,
    UnknownClientError,
    WrongRoundError,
)
from crossfed.server.federation_contract import ClientFacts, FederationContract
from crossfed.server.model_bundles import BundleStore
from crossfed.server.privacy_ledger import PrivacyLedger
from crossfed.server.projection_desk import ProjectionDesk, ProjectionReply
from crossfed.server.projection_exchange import (
    ProjectionNoiseHook,
    ProjectionSpec,
)
from crossfed.server.projection_privacy import ProjectionPrivacy
from crossfed.server.round_commit import RoundCommitter
from crossfed.server.round_policy import RoundPolicy
from crossfed.server.run_resume import fail_interrupted_rounds, load_or_create_run
from crossfed.server.sd_admission import (
    RECOVERY_FEATURE,
    SDRequirement,
    check_sd_weight,
    client_recovery,
)
from crossfed.server.state.base import StateStore
from crossfed.server.state.records import (
    CLIENT_REGISTERED,
    CLIENT_REMOVED,
    CLIENT_SELECTED,
    CLIENT_UPLOADED,
    ROUND_COMMITTED,
    ROUND_FAILED,
    ROUND_OPEN,
    RUN_COMPLETED,
    RUN_FAILED,
    RUN_PAUSED,
    RUN_RUNNING,
    RUN_STOPPED,
    TERMINAL_RUN_STATES,
    ClientRecord,
    EventRecord,
    RoundRecord,
    RunRecord,
    UploadRecord,
)
from crossfed.server.strategies.base import RoundAggregator, RoundInstructions, Strategy
from crossfed.server.strategies.central_dp import CentralDPStrategy
from crossfed.server.strategies.fedavg import FedAvg
from crossfed.server.update_bound import BoundCheck, UpdateBound, UpdateBounder
from crossfed.server.update_validation import (
    TensorSlot,
    required_keys,
    spec_of_state,
    validate_update,
)

Clock = Callable[[], float]
log = logging.getLogger(__name__)

# Actions (values match crossfed.v1.Action so the servicer can pass them through).
ACTION_WAIT = 1
ACTION_TRAIN = 2
ACTION_DONE = 3
ACTION_REGISTER = 4
ACTION_CALIBRATE = 5

# Modalities (crossfed.v1.ModalityConfig).
MODALITY_UNSPECIFIED = 0
_VALID_MODALITIES = {1, 2, 3}
_IMAGE_MODALITIES = {1, 3}  # BOTH, IMAGE_ONLY

# A client whose update is in is needed again the moment the round commits, so it polls
# faster than the base interval (else every round waits up to one poll interval for the
# last client to notice it); the fleet's total rate of such polls stays bounded.
_FINISHING_POLL_MIN_MS = 100
_FINISHING_POLLS_PER_S = 100


@dataclass(frozen=True)
class NextAction:
    """What a heartbeating client should do now (HeartbeatResponse without crypto fields)."""

    action: int
    round: int = 0
    attempt: int = 0
    poll_after_ms: int = 1000
    deadline_unix_s: float = 0.0
    local_epochs: int = 0
    run_state: str = ""
    message: str = ""
    proximal_mu: float = 0.0  # the strategy's FedProx mu for this round (0: plain training)


@dataclass(frozen=True)
class Registration:
    """What Register returns (RegisterResponse without transport fields)."""

    client_id: str
    run_id: str
    current_round: int
    heartbeat_interval_ms: int


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


@dataclass(frozen=True)
class UploadOutcome:
    """Result of an upload: accepted (counted once), or a duplicate of an earlier one."""

    accepted: bool
    duplicate: bool
    message: str
    round_closed: bool = False


@dataclass
class _OpenRound:
    record: RoundRecord
    aggregator: RoundAggregator | None  # None for the calibration round (it folds no weights)
    instructions: RoundInstructions = field(default_factory=RoundInstructions)
    uploaders: dict[str, str] = field(default_factory=dict)  # client_id -> upload_id
    min_reached_at: float | None = None
    metric_sums: dict[str, float] = field(default_factory=dict)
    metric_weights: dict[str, float] = field(default_factory=dict)
    stats: StatsSum | None = None  # set for the calibration round (which folds no weights)
    bounder: UpdateBounder | None = None  # the update bound of a training round, if any


@dataclass(frozen=True)
class _Closing:
    """A round attempt that stopped taking uploads and waits for (or is in) its commit."""

    opened: _OpenRound
    reason: str


def holds_images(client: ClientRecord) -> bool:
    """Whether a client registered rows with an image (what the calibration round needs)."""
    if client.num_paired or client.num_image_only or client.num_text_only:
        return client.num_paired + client.num_image_only > 0
    return client.modality in _IMAGE_MODALITIES


class RoundEngine:
    """Network-free federated-run state machine over a `StateStore` and `CheckpointStore`.

    Thread-safe: every public method takes one lock; heavy per-upload work (validation) runs
    outside it, and so does a round's commit (aggregate, server step, checkpoint fsync): it
    runs on a committer thread of its own (``commit_inline``: on the caller, after the lock is
    released; deterministic, for tests). Call `tick()` periodically (the server does, every
    ~0.5 s) so deadlines fire; `wait_idle` waits for a pending commit.
    """

    def __init__(
        self,
        store: StateStore,
        checkpoints: CheckpointStore,
        initial_state: Mapping[str, torch.Tensor],
        module_of: ModuleOf,
        policy: RoundPolicy,
        *,
        projection_spec: ProjectionSpec | None = None,
        model_config_digest: str = "",
        epsilon_budget: float = 0.0,
        noise_hook: ProjectionNoiseHook | None = None,
        projection_privacy: ProjectionPrivacy | None = None,
        strategy: Strategy | None = None,
        central_dp_delta: float = 1e-5,
        calibration: CalibrationStep | None = None,
        contract: FederationContract | None = None,
        bundles: BundleStore | None = None,
        sd_requirement: SDRequirement | None = None,
        update_bound: UpdateBound | None = None,
        clock: Clock = time.time,
        commit_inline: bool = False,
    ) -> None:
        self.store = store
        self.strategy: Strategy = strategy or FedAvg()
        self.commit_inline = commit_inline
        self.contract = contract
        self.bundles = bundles
        self.sd_requirement = sd_requirement
        self.update_bound = update_bound
        self.calibration = calibration
        self.central_dp_delta = central_dp_delta
        self.checkpoints = checkpoints
        self.module_of = module_of
        self.policy = policy
        self.projection_spec = projection_spec
        self.model_config_digest = model_config_digest
        self.epsilon_budget = epsilon_budget
        self.noise_hook = noise_hook
        # without one: exact projections taken (rows bounded), no epsilon accounted
        self.projection_privacy = projection_privacy or ProjectionPrivacy(None, PrivacyLedger(None))
        self.clock = clock
        self._lock = threading.RLock()
        self.events_changed = threading.Condition(self._lock)
        self._spec = spec_of_state(initial_state)
        self._open: _OpenRound | None = None
        self._closing: _Closing | None = None
        self._commit_started = False
        self._idle = threading.Condition(self._lock)
        self._waiting_since: float | None = None
        self._global_bytes: bytes | None = None

        def event(kind: str, round_no: int, message: str) -> None:
            self._event(kind, round_no=round_no, message=message)

        self._run = load_or_create_run(
            store, checkpoints, policy, initial_state, self.clock(), event
        )
        self._global = checkpoints.load_checked(self._run.last_committed_round, self._spec)
        self.registry = ClientRegistry(store, lambda: self.policy.client_timeout_s)
        self.projections = ProjectionDesk(projection_spec, self.projection_privacy, noise_hook)
        self.projections.load_published(checkpoints, self._run.last_committed_round)
        self.committer = RoundCommitter(self.strategy, checkpoints, self._spec)
        try:
            self.committer.load_state(self._run.last_committed_round)
        except ValueError as exc:  # e.g. fedadam's moments offered to fedavg after a restart
            raise ConfigurationError(
                f"strategy {self.strategy.name!r} cannot resume this run: the state saved with "
                f"round {self._run.last_committed_round} does not fit it ({exc}). Start with "
                "the strategy the run was started with, or use a new state directory"
            ) from exc
        fail_interrupted_rounds(store, self.clock(), event)
        self.registry.reset_after_restart()

    # ------------------------------------------------------------------ startup / resume
    # ------------------------------------------------------------------ helpers
    def _event(
        self,
        kind: str,
        round_no: int = 0,
        client_id: str = "",
        message: str = "",
        values: dict[str, float] | None = None,
    ) -> EventRecord:
        with self._lock:
            event = self.store.append_event(
                kind, self.clock(), round_no, client_id, message, values
            )
            self.events_changed.notify_all()
            return event

    def _next_round(self) -> int:
        return self._run.last_committed_round + 1

    def _final_round(self) -> int:
        """The round whose commit completes the run: the last training round, or the
        calibration round after it."""
        return self._run.total_rounds + (1 if self.calibration is not None else 0)

    def is_calibration_round(self, round_no: int) -> bool:
        """Whether ``round_no`` is the run's calibration round (none without calibration)."""
        return self.calibration is not None and round_no == self._run.total_rounds + 1

    def _attempts_of(self, round_no: int) -> list[RoundRecord]:
        return [r for r in self.store.list_rounds() if r.round == round_no]

    # ------------------------------------------------------------------ public: queries
    @property
    def run(self) -> RunRecord:
        """A copy of the run record."""
        with self._lock:
            return RunRecord(**vars(self._run))

    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        """The current global model (version = last committed round)."""
        with self._lock:
            return dict(self._global)

    @property
    def open_round(self) -> RoundRecord | None:
        """The open round attempt, if any (a copy)."""
        with self._lock:
            if self._open is None:
                return None
            return RoundRecord(
                **{**vars(self._open.record), "selected": list(self._open.record.selected)}
            )

    def clients(self) -> list[ClientRecord]:
        """All clients with state 'offline' substituted for silent ones."""
        with self._lock:
            return self.registry.snapshot(self.clock())

    # ------------------------------------------------------------------ public: clients
    def register(
        self,
        client_id: str,
        modality: int,
        num_samples: int,
        num_paired: int = 0,
        num_text_only: int = 0,
        num_image_only: int = 0,
        model_config_digest: str = "",
        daemon_version: str = "",
        facts: ClientFacts | None = None,
        sd_checkpoint_digest: str = "",
    ) -> Registration:
        """Register (or re-register after a reconnect) a client; idempotent. With a federation
        contract, ``facts`` (classes, labels, encoders) must fit it first."""
        if not client_id:
            raise UnknownClientError("no client id on the request; authenticate first")
        if modality not in _VALID_MODALITIES:
            raise InvalidUpdateError(
                f"modality {modality} is not one of BOTH(1), TEXT_ONLY(2), IMAGE_ONLY(3)"
            )
        if num_samples <= 0:
            raise InvalidUpdateError(f"num_samples must be > 0, got {num_samples}")
        parts = num_paired + num_text_only + num_image_only
        if parts and parts != num_samples:
            raise InvalidUpdateError(
                f"num_paired+num_text_only+num_image_only = {parts} but num_samples = "
                f"{num_samples}; they must agree"
            )
        if (
            model_config_digest
            and self.model_config_digest
            and model_config_digest != self.model_config_digest
        ):
            raise ModelMismatchError(
                f"client model config digest {model_config_digest[:16]}... does not match the "
                f"server's {self.model_config_digest[:16]}...; use the server's ModelConfig"
            )
        try:
            recovery = client_recovery(self.sd_requirement, sd_checkpoint_digest)
            if self.contract is not None:
                self.contract.admit(client_id, facts or ClientFacts())
        except (ModelMismatchError, FederationMismatchError) as exc:
            self._event("client_refused", client_id=client_id, message=str(exc))
            raise
        with self._lock:
            self.registry.recovery_of[client_id] = recovery
            now = self.clock()
            existing = self.registry.get(client_id)
            state = CLIENT_REGISTERED
            if existing is not None and existing.state in (CLIENT_SELECTED, CLIENT_UPLOADED):
                state = existing.state  # reconnect while selected: keep its place
            client = ClientRecord(
                client_id=client_id,
                modality=modality,
                num_samples=num_samples,
                num_paired=num_paired,
                num_text_only=num_text_only,
                num_image_only=num_image_only,
                state=state,
                registered_unix_s=existing.registered_unix_s if existing else now,
                last_seen_unix_s=now,
                last_round=existing.last_round if existing else 0,
                rounds_completed=existing.rounds_completed if existing else 0,
                daemon_version=daemon_version,
            )
            self.registry.save(client)
            self.registry.mark_seen(client_id)
            if existing is None or existing.state == CLIENT_REMOVED:
                self._event(
                    "client_registered",
                    client_id=client_id,
                    values={
                        "num_samples": float(num_samples),
                        "modality": float(modality),
                        "stable_diffusion": float(recovery != RECOVERY_FEATURE),
                    },
                )
            current = self._open.record.round if self._open else self._next_round()
            return Registration(
                client_id, self._run.run_id, current, self.policy.heartbeat_interval_ms
            )

    def heartbeat(self, client_id: str) -> NextAction:
        """Liveness + what to do now: TRAIN a round, WAIT, DONE, or REGISTER again."""
        with self._lock:
            client = self.registry.get(client_id)
            poll = self.policy.poll_after_ms
            if client is None or client.state == CLIENT_REMOVED:
                return NextAction(
                    ACTION_REGISTER,
                    poll_after_ms=poll,
                    run_state=self._run.state,
                    message="this server does not know you; register again",
                )
            self.registry.touch(client, self.clock())
            self._tick_locked()
        self._commit_pending_inline()
        with self._lock:
            run = self._run
            closing = self._closing
            if closing is not None and run.state not in TERMINAL_RUN_STATES:
                record = closing.opened.record
                if client_id in closing.opened.uploaders:
                    poll = min(poll, _FINISHING_POLL_MIN_MS)  # needed again right after it
                return NextAction(
                    ACTION_WAIT,
                    poll_after_ms=poll,
                    run_state=run.state,
                    message=f"round {record.round} is being committed",
                )
            if run.state in TERMINAL_RUN_STATES:
                return NextAction(
                    ACTION_DONE,
                    poll_after_ms=poll,
                    run_state=run.state,
                    message=f"run {run.state}: {run.message}".rstrip(": "),
                )
            opened = self._open
            if opened is not None and client_id in opened.record.selected:
                if client_id not in opened.uploaders:
                    record = opened.record
                    calibrate = opened.stats is not None
                    what = "send calibration statistics for round" if calibrate else "train round"
                    return NextAction(
                        ACTION_CALIBRATE if calibrate else ACTION_TRAIN,
                        round=record.round,
                        attempt=record.attempt,
                        poll_after_ms=poll,
                        deadline_unix_s=record.deadline_unix_s,
                        local_epochs=0 if calibrate else self.policy.local_epochs,
                        run_state=run.state,
                        message=f"{what} {record.round} (attempt {record.attempt})",
                        proximal_mu=opened.instructions.proximal_mu,
                    )
                why = f"your update for round {opened.record.round} is in; waiting for others"
                poll = min(
                    poll,
                    max(
                        _FINISHING_POLL_MIN_MS,
                        -(-1000 * len(opened.uploaders) // _FINISHING_POLLS_PER_S),
                    ),
                )
            elif opened is not None:
                why = f"round {opened.record.round} is running without you"
            elif run.state != RUN_RUNNING:
                why = f"run is {run.state}"
            else:
                why = "waiting for enough clients to start the next round"
            return NextAction(ACTION_WAIT, poll_after_ms=poll, run_state=run.state, message=why)

    def remove_client(self, client_id: str) -> bool:
        """Forget a client (it gets ACTION_REGISTER); False if it was unknown."""
        with self._lock:
            client = self.registry.get(client_id)
            if client is None or client.state == CLIENT_REMOVED:
                return False
            client.state = CLIENT_REMOVED
            self.registry.save(client)
            self._event("client_removed", client_id=client_id)
            return True

    # ------------------------------------------------------------------ public: run control
    def start(self) -> RunRecord:
        """Start an idle run (or resume a paused one)."""
        with self._lock:
            if self._run.state in TERMINAL_RUN_STATES:
                raise RunNotActiveError(
                    f"run {self._run.run_id} is {self._run.state}; start a new one"
                )
            if self._run.state != RUN_RUNNING:
                self._set_run_state(RUN_RUNNING, "started")
            return self.run

    def pause(self, reason: str = "") -> RunRecord:
        """No new rounds start; an open round runs to its end."""
        with self._lock:
            if self._run.state != RUN_RUNNING:
                raise RunNotActiveError(f"run is {self._run.state}, only a running run can pause")
            self._set_run_state(RUN_PAUSED, reason or "paused")
            return self.run

    def resume(self, reason: str = "") -> RunRecord:
        """Resume a paused run (only a paused one: anything else is a precondition error)."""
        with self._lock:
            if self._run.state != RUN_PAUSED:
                raise RunNotActiveError(f"run is {self._run.state}, only a paused run can resume")
            self._set_run_state(RUN_RUNNING, reason or "resumed")
            return self.run

    def update_policy(self, policy: RoundPolicy) -> RunRecord:
        """Swap in a new round policy (admin live config); ``policy.total_rounds`` becomes the
        run's total. Deadlines of an already open round are kept; the next round uses it."""
        with self._lock:
            last = self._run.last_committed_round
            if policy.total_rounds < last:
                raise RunNotActiveError(
                    f"rounds={policy.total_rounds} is below the {last} round(s) already committed"
                )
            before = vars(self.policy)
            changed = {k: v for k, v in vars(policy).items() if before.get(k) != v}
            if self._run.total_rounds != policy.total_rounds:
                # the database first: if it refuses, memory keeps the old policy too
                self.store.put_run(replace(self._run, total_rounds=policy.total_rounds))
                self._run.total_rounds = policy.total_rounds
            self.policy = policy
            message = " ".join(f"{k}={v}" for k, v in changed.items()) or "no change"
            self._event("policy_updated", round_no=last, message=message)
            opened = self._open
            if opened is not None and (opened.stats is not None) != self.is_calibration_round(
                opened.record.round
            ):
                # the open round changed kind (calibration <-> training): drop it uncounted,
                # the next tick opens the right one from the same input model
                opened.record.counts_as_retry = False
                self._fail_open_locked(
                    f"rounds changed to {policy.total_rounds} while round "
                    f"{opened.record.round} was open; it is re-run as a "
                    f"{'training' if opened.stats is not None else 'calibration'} round",
                    retry=False,
                )
            return self.run

    def stop(self, reason: str = "") -> RunRecord:
        """End the run now; an open round is failed and clients are told DONE."""
        with self._lock:
            if self._run.state in TERMINAL_RUN_STATES:
                return self.run
            if self._open is not None:
                self._fail_open_locked(f"run stopped: {reason or 'by operator'}", retry=False)
            self._set_run_state(RUN_STOPPED, reason or "stopped by operator")
            return self.run

    def _set_run_state(self, state: str, message: str) -> None:
        self._run.state = state
        self._run.message = message
        self.store.put_run(self._run)
        self._waiting_since = None
        self._event(f"run_{state}", round_no=self._run.last_committed_round, message=message)

    # ------------------------------------------------------------------ time-driven transitions
    def tick(self) -> None:
        """Advance the state machine: open, close (commit/fail) rounds as time passes."""
        with self._lock:
            self._tick_locked()
        self._commit_pending_inline()

    def _tick_locked(self) -> None:
        run = self._run
        if self._closing is not None:  # nothing moves until the closing round's commit ends
            return
        # a paused run still closes its open round (commit/fail); it only opens no new one
        if run.state != RUN_RUNNING and not (run.state == RUN_PAUSED and self._open is not None):
            return
        if run.last_committed_round >= self._final_round():
            self._set_run_state(RUN_COMPLETED, f"all {run.total_rounds} rounds committed")
            return
        now = self.clock()
        if self._open is None:
            available = self.registry.online_ids(now)
            if len(available) >= self.policy.min_clients:
                if self.is_calibration_round(self._next_round()):
                    self._open_calibration_locked(available, now)
                else:
                    self._open_round_locked(available, now)
                return
            if self._waiting_since is None:
                self._waiting_since = now
            elif now - self._waiting_since >= self.policy.start_timeout_s:
                self._record_start_failure(len(available), now)
            return
        opened = self._open
        received = len(opened.uploaders)
        selected = len(opened.record.selected)
        needed = self._min_uploads(opened)
        if received >= selected:
            self._close_locked("every selected client uploaded")
        elif self.policy.straggler_fraction < 1.0 and self.policy.enough_to_close(
            received, selected
        ):
            self._close_locked(
                f"straggler cut-off: {received}/{selected} uploaded "
                f"(straggler_fraction={self.policy.straggler_fraction:g})"
            )
        elif (
            received >= needed
            and self.policy.wait_after_min_s is not None
            and opened.min_reached_at is not None
            and now - opened.min_reached_at >= self.policy.wait_after_min_s
        ):
            self._close_locked(
                f"straggler cut-off: {received}/{selected} uploaded, "
                f"{self.policy.wait_after_min_s:g} s after min_clients was reached"
            )
        elif now >= opened.record.deadline_unix_s:
            if received >= needed:
                self._close_locked(f"deadline: {received}/{selected} uploaded")
            else:
                why = (
                    f"min_clients is {needed}"
                    if needed == self.policy.min_clients
                    else f"{needed} needed (every selected client)"
                )
                self._fail_open_locked(
                    f"deadline passed with {received} upload(s); {why}", retry=True
                )

    def _min_uploads(self, opened: _OpenRound) -> int:
        """Uploads a round needs to commit: min_clients, or for the calibration round (whose
        selection is every online client holding images) at most that many."""
        if opened.stats is not None:
            return min(self.policy.min_clients, len(opened.record.selected))
        return self.policy.min_clients

    def _open_calibration_locked(self, available: list[str], now: float) -> None:
        """Open the calibration round for every online client holding images; none: the
        run completes with the last training round's model, uncalibrated."""
        holders = sorted(cid for cid in available if holds_images(self.registry.records[cid]))
        if not holders:
            self._skip_calibration_locked(
                f"none of the {len(available)} online client(s) holds images"
            )
            return
        self._open_round_locked(holders, now, calibration=True)

    def _skip_calibration_locked(self, why: str) -> None:
        self._set_run_state(
            RUN_COMPLETED,
            f"all {self._run.total_rounds} rounds committed; image-only calibration skipped: {why}",
        )

    def _open_round_locked(
        self, available: list[str], now: float, calibration: bool = False
    ) -> None:
        round_no = self._next_round()
        attempt = 1 + max((r.attempt for r in self._attempts_of(round_no)), default=0)
        selected = available if calibration else self.policy.select(available, round_no, attempt)
        record = RoundRecord(
            round=round_no,
            attempt=attempt,
            state=ROUND_OPEN,
            started_unix_s=now,
            deadline_unix_s=now + self.policy.round_deadline_s,
            selected=selected,
        )
        self.store.put_round(record)
        self._open = _OpenRound(
            record=record,
            aggregator=None
            if calibration
            else self.strategy.begin_round(self._global, self.module_of),
            instructions=RoundInstructions()
            if calibration
            else self.strategy.configure_round(round_no),
            stats=StatsSum(self.calibration.spec) if calibration and self.calibration else None,
            bounder=(
                UpdateBounder(self._global, self.update_bound)
                if self.update_bound is not None and not calibration
                else None
            ),
        )
        self._waiting_since = None
        for cid in selected:
            client = self.registry.records[cid]
            client.state = CLIENT_SELECTED
            self.registry.save(client)
        kind = "calibration, " if calibration else ""
        self._event(
            "round_started",
            round_no=round_no,
            message=f"{kind}attempt {attempt}: selected {len(selected)} of {len(available)} "
            + ("online holding images" if calibration else "online"),
            values={"attempt": float(attempt), "selected": float(len(selected))},
        )

    def _record_start_failure(self, available: int, now: float) -> None:
        round_no = self._next_round()
        attempt = 1 + max((r.attempt for r in self._attempts_of(round_no)), default=0)
        record = RoundRecord(
            round=round_no,
            attempt=attempt,
            state=ROUND_FAILED,
            started_unix_s=self._waiting_since or now,
            deadline_unix_s=now,
            ended_unix_s=now,
            message=(
                f"only {available} client(s) online after {self.policy.start_timeout_s:g} s; "
                f"min_clients is {self.policy.min_clients}"
            ),
        )
        self.store.put_round(record)
        self._event("round_failed", round_no=round_no, message=record.message)
        self._after_failure(round_no, record.message)

    def _fail_open_locked(self, message: str, retry: bool) -> None:
        """End the open attempt as failed (see `_fail_round_locked`)."""
        assert self._open is not None
        opened, self._open = self._open, None
        self._fail_round_locked(opened, message, retry)

    def _fail_round_locked(self, opened: _OpenRound, message: str, retry: bool) -> None:
        """End an attempt as failed. Memory moves on even when the database refuses the
        record (full disk, lock): a restart would find the attempt still open and re-run it as
        interrupted, the same outcome, so a failing database never wedges the open round."""
        record = opened.record
        record.state = ROUND_FAILED
        record.ended_unix_s = self.clock()
        record.message = message
        self._write_best_effort(f"failure of round {record.round}", self.store.put_round, record)
        self.registry.release(record.selected)
        self._write_best_effort(
            "round_failed event",
            lambda: self._event("round_failed", round_no=record.round, message=message),
        )
        if retry:
            self._after_failure(record.round, message)

    def _write_best_effort(self, what: str, write: Callable[..., object], *args: object) -> bool:
        """Run a state write on a failure path; log (not raise) if the database refuses it."""
        try:
            write(*args)
        except StateStoreError as exc:
            log.error("could not record the %s: %s", what, exc)
            return False
        return True

    def _after_failure(self, round_no: int, message: str) -> None:
        """Retry the round (new attempt) or end the run when attempts are used up. Attempts
        the database could not record do not count: they are retried like interrupted ones.
        A run that ended meanwhile (stopped while the attempt's commit ran outside the lock)
        keeps its state: the operator's stop is not overwritten by 'failed' or 'completed'."""
        if self._run.state in TERMINAL_RUN_STATES:
            return
        try:
            attempts = self._attempts_of(round_no)
        except StateStoreError as exc:
            log.error("could not read the attempts of round %d: %s", round_no, exc)
            attempts = []
        failures = sum(1 for r in attempts if r.state == ROUND_FAILED and r.counts_as_retry)
        if failures >= self.policy.max_round_attempts and self.is_calibration_round(round_no):
            self._skip_calibration_locked(f"it failed {failures} time(s); last reason: {message}")
        elif failures >= self.policy.max_round_attempts:
            self._set_run_state(
                RUN_FAILED,
                f"round {round_no} failed {failures} time(s) (max_round_attempts="
                f"{self.policy.max_round_attempts}); last reason: {message}",
            )
        else:
            self._waiting_since = self.clock()

    def _close_locked(self, reason: str) -> None:
        """The open attempt takes no more uploads; its commit runs off this thread (or, with
        ``commit_inline``, on the caller once it released the lock)."""
        assert self._open is not None and self._closing is None
        self._closing = _Closing(self._open, reason)
        self._open = None
        # the serialized input model is not needed any more (a late download reloads it from
        # its checkpoint): dropping it first keeps the commit's peak memory lower
        self._global_bytes = None
        self._commit_started = False
        if not self.commit_inline:
            self._commit_started = True
            threading.Thread(target=self._run_commit, name="round-commit", daemon=True).start()

    def _commit_pending_inline(self) -> None:
        """Run a commit left by a public method (``commit_inline``), outside the lock."""
        with self._lock:
            if self._closing is None or self._commit_started:
                return
            self._commit_started = True
        self._run_commit()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no commit is pending; False if one still is after ``timeout`` s."""
        with self._lock:
            return self._idle.wait_for(lambda: self._closing is None, timeout)

    def _run_commit(self) -> None:
        """Commit the closing attempt; it never leaves the engine stuck in 'closing'."""
        with self._lock:
            closing = self._closing
        if closing is None:
            return
        try:
            self._commit(closing.opened, closing.reason)
        except Exception as exc:  # a bug must fail the attempt, not wedge the run
            log.exception("commit of round %d failed", closing.opened.record.round)
            with self._lock:
                state = closing.opened.record.state
                try:
                    if state not in (ROUND_COMMITTED, ROUND_FAILED):
                        self._fail_round_locked(
                            closing.opened,
                            f"commit failed: {exc}; the round is re-run",
                            retry=True,
                        )
                finally:  # even if recording the failure raised (database down)
                    if state != ROUND_COMMITTED:
                        self._rollback_strategy_locked()
        finally:
            with self._lock:
                self._closing = None
                self._idle.notify_all()

    def _commit(self, opened: _OpenRound, reason: str) -> None:
        """Aggregate, step the strategy and checkpoint outside the lock; then, under it,
        publish the prototypes and record the commit atomically."""
        record = opened.record
        started = time.perf_counter()
        if opened.stats is not None:
            assert self.calibration is not None
            new_state, reason = calibrated_model(
                self.calibration, self._global, opened.stats, self._spec, reason
            )
            prepared = self.committer.write(record.round, self._run.run_id, new_state)
        else:
            prepared = self.committer.prepare_training(
                record.round, self._run.run_id, self._global, self._aggregator(opened)
            )
        if prepared.refused:
            with self._lock:
                self._refuse_commit_locked(opened, prepared.refused, prepared.message)
            return
        new_state, values = prepared.state, prepared.values
        with self._lock:
            if not self._record_commit_locked(opened, reason, new_state):
                self._rollback_strategy_locked()
                return
            committed_values = {
                "received": float(record.received),
                "num_samples": float(record.num_samples),
                "aggregate_s": time.perf_counter() - started,
                **record.metrics,
                **values,
                **(
                    self.strategy.epsilon_values(
                        record.round, self.policy.fraction, self.central_dp_delta
                    )
                    if opened.stats is None and isinstance(self.strategy, CentralDPStrategy)
                    else {}
                ),
            }
            # the commit is recorded: a refused event must not skip completion and pruning
            self._write_best_effort(
                "round_committed event",
                lambda: self._event(
                    "round_committed",
                    round_no=record.round,
                    message=reason,
                    values=committed_values,
                ),
            )
            log.info(
                "round %d committed: %d upload(s), %d samples, %.1f s, epsilon %.2f so far%s",
                record.round,
                record.received,
                record.num_samples,
                record.ended_unix_s - record.started_unix_s,
                self._run.epsilon_spent,
                " (calibration)" if opened.stats is not None else "",
            )
            if (
                self._run.last_committed_round >= self._final_round()
                and self._run.state not in TERMINAL_RUN_STATES
            ):
                done = f"all {self._run.total_rounds} rounds committed"
                self._set_run_state(
                    RUN_COMPLETED,
                    f"{done}; calibration: {reason}" if opened.stats is not None else done,
                )
        self.committer.after_commit(
            record.round,
            new_state,
            self.bundles,
            lambda message: self._write_best_effort(
                "bundle_failed event",
                lambda: self._event("bundle_failed", round_no=record.round, message=message),
            ),
        )

    def _record_commit_locked(
        self, opened: _OpenRound, reason: str, new_state: dict[str, torch.Tensor]
    ) -> bool:
        """Publish the pending prototypes, record the commit in the database, then move
        memory on; False (the attempt failed, to be retried) when the disk or the database
        refuses."""
        record = opened.record
        if (opened.stats is not None) != self.is_calibration_round(record.round):
            # rounds changed (update_policy) while this commit ran outside the lock: the
            # round is now of the other kind; dropped uncounted like an open one would be
            record.counts_as_retry = False
            self._fail_round_locked(
                opened,
                f"rounds changed to {self._run.total_rounds} while round {record.round} "
                f"was being committed; it is re-run as a "
                f"{'training' if opened.stats is not None else 'calibration'} round",
                retry=False,
            )
            return False
        published: tuple[int, bytes] | None = None
        try:  # late projections of the last training round stay unpublished at calibration
            if opened.stats is None:
                published = self.projections.publish(record.round, self.checkpoints)
        except OSError as exc:
            self._refuse_commit_locked(
                opened,
                "checkpoint_failed",
                f"checkpoint of round {record.round} could not be written "
                f"({exc.strerror or exc}); the round is not committed, the last good "
                "checkpoint is kept",
            )
            return False
        before = (record.state, record.ended_unix_s, record.message, record.metrics)
        last_before = self._run.last_committed_round
        record.state = ROUND_COMMITTED
        record.ended_unix_s = self.clock()
        record.message = reason
        record.metrics = {
            k: opened.metric_sums[k] / opened.metric_weights[k]
            for k in opened.metric_sums
            if opened.metric_weights[k] > 0
        }
        self._run.last_committed_round = record.round
        try:
            self.store.commit_round(record, self._run)
        except Exception as exc:
            # Memory must not run ahead of the database: undo, and fail the attempt like a
            # checkpoint that could not be written (the new checkpoint file is overwritten
            # by the retry; a restart reads the last round the database committed).
            record.state, record.ended_unix_s, record.message, record.metrics = before
            self._run.last_committed_round = last_before
            if not isinstance(exc, StateStoreError):
                raise  # a bug: the committer fails the attempt (its record is not committed)
            message = f"round {record.round} could not be recorded ({exc}); not committed"
            log.error(message)
            self._write_best_effort(
                "commit_failed event",
                lambda: self._event("commit_failed", round_no=record.round, message=message),
            )
            self._fail_round_locked(opened, message, retry=True)
            return False
        if published is not None:
            self.projections.adopt(published)
        self._global = new_state
        self._global_bytes = None
        for cid in opened.uploaders:
            client = self.registry.records[cid]
            client.rounds_completed += 1 if opened.stats is None else 0
            client.last_round = record.round
        self.registry.release(record.selected)
        for cid in opened.uploaders:
            self.registry.save(self.registry.records[cid])
        return True

    def _rollback_strategy_locked(self) -> None:
        """Restore the strategy's state of the last committed round after a failed commit
        (its step on the failed aggregate must not count). If that state cannot be read, the
        run fails: training on would step the optimizer twice on one round."""
        last = self._run.last_committed_round
        try:
            self.committer.load_state(last)
        except Exception as exc:
            log.exception("could not restore the strategy state of round %d", last)
            if self._run.state not in TERMINAL_RUN_STATES:
                self._write_best_effort(
                    "run failure",
                    self._set_run_state,
                    RUN_FAILED,
                    f"the strategy state of round {last} could not be restored after a "
                    f"failed commit ({exc}); fix or remove it and restart the server",
                )

    def _aggregator(self, opened: _OpenRound) -> RoundAggregator:
        """The training round's aggregator (the calibration round has none)."""
        if opened.aggregator is None:
            raise WrongRoundError(f"round {opened.record.round} is the calibration round")
        return opened.aggregator

    def _refuse_commit_locked(self, opened: _OpenRound, kind: str, message: str) -> None:
        """The round's new model is unusable or could not be written: the attempt fails (and
        is retried, bounded by max_round_attempts); the last good model stays, and so does
        the strategy's state of the last committed round."""
        self._rollback_strategy_locked()
        log.error(message)
        self._write_best_effort(
            f"{kind} event",
            lambda: self._event(kind, round_no=opened.record.round, message=message),
        )
        self._fail_round_locked(opened, message, retry=True)

    # ------------------------------------------------------------------ model download
    def global_model_bytes(self, round_no: int) -> tuple[int, bytes]:
        """Safetensors bytes of the model round ``round_no`` trains from (its input, version
        round_no-1); ``round_no`` 0 means the latest committed model. Returns (version, bytes)."""
        with self._lock:
            last = self._run.last_committed_round
            version = last if round_no == 0 else round_no - 1
            if version > last:
                raise WrongRoundError(
                    f"round {round_no} has not started; the latest committed round is {last}"
                )
            if version == last:
                if self._global_bytes is None:
                    self._global_bytes = self.checkpoints.load_bytes(last)
                return version, self._global_bytes
        try:
            return version, self.checkpoints.load_bytes(version)
        except CheckpointError as exc:
            raise WrongRoundError(
                f"the input model of round {round_no} is no longer kept: {exc}"
            ) from exc

    def global_model_file(self, round_no: int) -> tuple[int, Path]:
        """Checkpoint file of the model round ``round_no`` trains from (same versions as
        `global_model_bytes`); downloads stream it chunk by chunk instead of holding a copy
        of the serialized model in server memory for the whole round."""
        with self._lock:
            last = self._run.last_committed_round
            version = last if round_no == 0 else round_no - 1
            if version > last:
                raise WrongRoundError(
                    f"round {round_no} has not started; the latest committed round is {last}"
                )
        path = self.checkpoints.path_of(version)
        if not path.is_file():
            raise WrongRoundError(
                f"the input model of round {round_no} is no longer kept (no {path.name})"
            )
        return version, path

    # ------------------------------------------------------------------ uploads
    def begin_upload(
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
        with self._lock:
            client = self.registry.known(client_id)
            self.registry.touch(client, self.clock())
            opened = self._require_open(round_no)
            record = opened.record
            if opened.uploaders.get(client_id) == upload_id or self.store.get_upload(
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
            calibration = opened.stats is not None and self.calibration is not None
            weights = (
                {}
                if calibration
                else module_weights_of(
                    num_samples, module_samples, self._aggregator(opened).modules
                )
            )
            check_sd_weight(client_id, self.registry.recovery_of.get(client_id), weights)
            return UploadTicket(
                client_id=client_id,
                upload_id=upload_id,
                round=record.round,
                attempt=record.attempt,
                num_samples=num_samples,
                module_samples=dict(module_samples),
                weights=weights,
                spec=self.calibration.spec if calibration and self.calibration else self._spec,
                calibration=calibration,
                required=None
                if calibration
                else required_keys(self._spec, weights, self.module_of),
            )

    def _require_open(self, round_no: int) -> _OpenRound:
        if self._run.state in TERMINAL_RUN_STATES:
            raise RunNotActiveError(f"the run is {self._run.state}; nothing more is accepted")
        opened = self._open
        last = self._run.last_committed_round
        closing = self._closing
        if opened is None and closing is not None and closing.opened.record.round == round_no:
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

    def complete_upload(
        self,
        ticket: UploadTicket,
        tensors: Mapping[str, torch.Tensor],
        payload_sha256: str = "",
        metrics: Mapping[str, float] | None = None,
    ) -> UploadOutcome:
        """Validate the decoded update fully, then (and only then) fold it into the sum."""
        try:
            validate_update(tensors, ticket.spec, required=ticket.required)
            if ticket.calibration:
                assert self.calibration is not None
                self.calibration.check(tensors, ticket.num_samples)
                self.projection_privacy.admit_calibration(  # counted before it is used
                    ticket.client_id, metrics or {}, ticket.num_samples, self.epsilon_budget
                )
        except (InvalidUpdateError, PrivacyBudgetExceededError, PrivacyMandateError) as exc:
            self._event("upload_rejected", ticket.round, ticket.client_id, str(exc))
            raise
        bound = self._bound_check(ticket, tensors)
        with self._lock:
            opened = self._open
            if (
                opened is None
                or opened.record.round != ticket.round
                or opened.record.attempt != ticket.attempt
            ):
                raise WrongRoundError(
                    f"round {ticket.round} (attempt {ticket.attempt}) closed before the upload "
                    "finished; the update was not counted"
                )
            upload = UploadRecord(
                upload_id=ticket.upload_id,
                client_id=ticket.client_id,
                round=ticket.round,
                attempt=ticket.attempt,
                num_samples=ticket.num_samples,
                received_unix_s=self.clock(),
                payload_sha256=payload_sha256,
                module_samples=ticket.module_samples,
                metrics=dict(metrics or {}),
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
            if opened.stats is not None:
                opened.stats.add(tensors)
            else:
                self._aggregator(opened).add(
                    tensors, ticket.weights, ticket.num_samples, bound.scale if bound else 1.0
                )
            fold_s = time.perf_counter() - fold_started
            opened.uploaders[ticket.client_id] = ticket.upload_id
            self._write_best_effort(
                f"upload row of {ticket.client_id}", self.store.add_upload, upload
            )
            for key, value in (metrics or {}).items():
                opened.metric_sums[key] = (
                    opened.metric_sums.get(key, 0.0) + value * ticket.num_samples
                )
                opened.metric_weights[key] = (
                    opened.metric_weights.get(key, 0.0) + ticket.num_samples
                )
            record = opened.record
            record.received = len(opened.uploaders)
            record.num_samples += ticket.num_samples
            client = self.registry.records[ticket.client_id]
            client.state = CLIENT_UPLOADED
            now = self.clock()
            if opened.min_reached_at is None and record.received >= self._min_uploads(opened):
                opened.min_reached_at = now
            # The update is counted (its upload row is stored, the sum holds it): progress
            # records below are best effort, the commit writes the round record again.
            self._write_best_effort(
                f"progress of round {record.round}", self.store.put_round, record
            )
            self._write_best_effort(f"upload of {client.client_id}", self.registry.save, client)
            if bound is not None and bound.clipped:
                self._write_best_effort(
                    "update_clipped event", self._update_clipped_event, ticket, bound
                )
            accepted_values = {"num_samples": float(ticket.num_samples), "fold_s": fold_s}
            if bound is not None:
                accepted_values["update_norm_ratio"] = bound.ratio
            self._write_best_effort(
                "upload_accepted event",
                lambda: self._event(
                    "upload_accepted",
                    ticket.round,
                    ticket.client_id,
                    f"upload {ticket.upload_id}",
                    accepted_values,
                ),
            )
            self._tick_locked()
            closed = self._open is not opened
        self._commit_pending_inline()
        return UploadOutcome(
            True, False, f"update for round {ticket.round} accepted", round_closed=closed
        )

    def _bound_check(
        self, ticket: UploadTicket, tensors: Mapping[str, torch.Tensor]
    ) -> BoundCheck | None:
        """Measure a training update against the update bound (outside the lock: one pass
        over the update); None without a bound or when the attempt is no longer open."""
        with self._lock:
            opened = self._open
        if (
            ticket.calibration
            or opened is None
            or opened.bounder is None
            or (opened.record.round, opened.record.attempt) != (ticket.round, ticket.attempt)
        ):
            return None
        keys = self._aggregator(opened).contributed_keys(ticket.weights)
        return opened.bounder.check(tensors, keys)

    def _update_clipped_event(self, ticket: UploadTicket, bound: BoundCheck) -> None:
        self._event(
            "update_clipped",
            ticket.round,
            ticket.client_id,
            f"update {ticket.upload_id} lies {bound.distance:.4g} from the global model, past "
            f"the bound {bound.limit:.4g} (update_bound.max_norm_ratio "
            f"{self.update_bound.max_norm_ratio if self.update_bound else 0:g} x its norm "
            f"{bound.reference:.4g}); folded in scaled by {bound.scale:.3g}",
            {"distance": bound.distance, "limit": bound.limit, "scale": bound.scale},
        )

    def record_event(
        self, kind: str, round_no: int = 0, client_id: str = "", message: str = ""
    ) -> None:
        """Log an event that happened outside the engine (e.g. enrollment)."""
        self._event(kind, round_no, client_id, message)

    def require_known(self, client_id: str) -> None:
        """Raise `UnknownClientError` unless ``client_id`` is registered (marks it alive)."""
        with self._lock:
            self.registry.touch(self.registry.known(client_id), self.clock())

    def new_client_id(self) -> str:
        """A fresh id for an unauthenticated (insecure-mode) client that sent none."""
        return f"client-{uuid.uuid4().hex[:12]}"

    def record_rejection(self, client_id: str, round_no: int, message: str) -> None:
        """Log a rejected upload (transport-level problems found by the servicer)."""
        self._event("upload_rejected", round_no, client_id, message)

    # ------------------------------------------------------------------ projections (eq. 16)
    def exchange_projections(
        self,
        client_id: str,
        round_no: int,
        payload: bytes,
        epsilon_spent: float = 0.0,
        mechanism: ProjectionDPParams | None = None,
    ) -> ProjectionReply:
        """Add a client's projection payload (if any) to the pending sums, published at the
        next commit; return the latest published global prototypes, (0, b"") before the
        first. Accepted for the open round (selected clients) and for the just-committed
        round from its uploaders (clients exchange after uploading). The payload is bounded
        and checked against the privacy mandate (``mechanism``: what the client declares it
        applied); its epsilon is the server's count, ``epsilon_spent`` (the client's own
        figure) is only recorded beside it."""
        with self._lock:
            client = self.registry.known(client_id)
            self.registry.touch(client, self.clock())
            registered = client.num_samples
        if payload:
            projections = self.projections.decode(payload)
            with self._lock:
                self._check_projection_round(client_id, round_no)
                fresh = self.projections.is_fresh(client_id, round_no)
            if fresh:  # a repeat is ignored, and not counted twice
                self._take_projections(
                    client_id, round_no, projections, registered, mechanism, epsilon_spent
                )
        with self._lock:
            return self.projections.reply(client_id, self.epsilon_budget)

    def _take_projections(
        self,
        client_id: str,
        round_no: int,
        projections: dict[str, torch.Tensor],
        registered: int,
        mechanism: ProjectionDPParams | None,
        reported_epsilon: float,
    ) -> None:
        """Bound, admit (mandate, noise, budget: counted before use) and add one release."""
        try:
            release = self.projections.admit(
                client_id, projections, registered, mechanism, self.epsilon_budget
            )
        except ServerError as exc:
            self._event("projections_refused", round_no, client_id, str(exc))
            raise
        with self._lock:
            self._check_projection_round(client_id, round_no)
            if not self.projections.add(client_id, round_no, release):
                return
            if release.epsilon > self._run.epsilon_spent:  # the run's: the largest client's
                self._run.epsilon_spent = release.epsilon
                self.store.put_run(self._run)
            values = {"epsilon_spent": release.epsilon, "clipped_rows": float(release.clipped_rows)}
            if math.isfinite(reported_epsilon):
                values["client_reported_epsilon"] = reported_epsilon
            self._event("projections_accepted", round_no, client_id, values=values)

    def _check_projection_round(self, client_id: str, round_no: int) -> None:
        if self._run.state in TERMINAL_RUN_STATES:
            raise RunNotActiveError(f"the run is {self._run.state}; nothing more is accepted")
        opened = self._open or (self._closing.opened if self._closing else None)
        if opened is not None and opened.record.round == round_no:
            if opened.stats is not None:
                raise WrongRoundError(
                    f"round {round_no} is the calibration round; it exchanges no projections"
                )
            if client_id not in opened.record.selected:
                raise NotSelectedError(
                    f"client {client_id!r} was not selected for round {round_no}"
                )
            return
        last = self._run.last_committed_round
        if 0 < last == round_no and self.registry.records[client_id].last_round == last:
            return  # an uploader of the just-committed round (there is none before round 1)
        raise WrongRoundError(
            f"projections for round {round_no} are not accepted now (open round: "
            f"{opened.record.round if opened else 'none'}, last committed: {last})"
        )


def load_prototypes(payload: bytes) -> dict[str, torch.Tensor]:
    """Decode a global-prototypes payload (for tests and clients)."""
    try:
        return decode_tensors(payload)
    except WireError as exc:
        raise InvalidUpdateError(f"prototypes payload is corrupt: {exc}") from exc
