"""The round engine: the scheduler of a federated run. It registers clients, answers
heartbeats with what to do next, opens round attempts (selection, deadlines), closes them
(all in, straggler cut-off, deadline) and hands a closed attempt to the commit pipeline. Plain
Python, no network: the gRPC servicers are thin shells on top.

Its parts share one `RoundBoard` (run, open and closing attempt, global model, one lock):
- `RoundUploads` (server/round_uploads.py): an upload's header, validation and fold;
- `CommitPipeline` (server/commit_pipeline.py): aggregate, strategy step, checkpoint, record;
- `RunLifecycle` (server/run_lifecycle.py): run states, failed attempts and their retries;
- `ProjectionIntake` (server/projection_intake.py): the projection exchange (eq. 16);
- `ModelDownloads` (server/model_downloads.py): which model a round trains from.
A `Strategy` (server/strategies) decides what a round asks of clients and how uploads become
the next model; a `CalibrationStep` adds the calibration round (server/round_attempt.py).

Round r trains from the global model of round r-1 (round 0 = the initial model). A failed or
interrupted attempt of round r is retried as a new attempt of the same round, from the same
input model, so no round is ever counted twice.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from crossfed.common.round_instructions import PLAIN, RoundInstructions
from crossfed.common.wire.errors import WireError
from crossfed.common.wire.tensor_codec import decode_tensors
from crossfed.server.aggregation import ModuleOf
from crossfed.server.calibration_round import CalibrationStep
from crossfed.server.checkpoints import CheckpointStore
from crossfed.server.client_registry import ClientRegistry
from crossfed.server.commit_pipeline import CommitPipeline
from crossfed.server.errors import (
    ConfigurationError,
    FederationMismatchError,
    InvalidUpdateError,
    ModelMismatchError,
    RunNotActiveError,
    UnknownClientError,
)
from crossfed.server.federation_contract import ClientFacts, FederationContract
from crossfed.server.model_bundles import BundleStore
from crossfed.server.model_downloads import ModelDownloads
from crossfed.server.privacy_ledger import PrivacyLedger
from crossfed.server.projection_desk import ProjectionDesk
from crossfed.server.projection_exchange import ProjectionNoiseHook, ProjectionSpec
from crossfed.server.projection_intake import ProjectionIntake
from crossfed.server.projection_privacy import ProjectionPrivacy
from crossfed.server.round_attempt import (
    ACTION_DONE,
    ACTION_REGISTER,
    ACTION_WAIT,
    Attempt,
    CalibrationAttempt,
    Closing,
    TrainingAttempt,
)
from crossfed.server.round_board import EventLog, RoundBoard
from crossfed.server.round_commit import RoundCommitter
from crossfed.server.round_policy import RoundPolicy
from crossfed.server.round_uploads import RoundUploads
from crossfed.server.run_lifecycle import RunLifecycle
from crossfed.server.run_resume import fail_interrupted_rounds, load_or_create_run
from crossfed.server.sd_admission import RECOVERY_FEATURE, SDRequirement, client_recovery
from crossfed.server.state.base import StateStore
from crossfed.server.state.records import (
    CLIENT_REGISTERED,
    CLIENT_REMOVED,
    CLIENT_SELECTED,
    CLIENT_UPLOADED,
    ROUND_OPEN,
    RUN_PAUSED,
    RUN_RUNNING,
    RUN_STOPPED,
    TERMINAL_RUN_STATES,
    ClientRecord,
    RoundRecord,
    RunRecord,
)
from crossfed.server.strategies.base import Strategy
from crossfed.server.strategies.central_dp import CentralDPAggregator
from crossfed.server.strategies.fedavg import FedAvg
from crossfed.server.update_bound import UpdateBound, UpdateBounder
from crossfed.server.update_validation import spec_of_state

Clock = Callable[[], float]
log = logging.getLogger(__name__)

# Modalities (crossfed.v1.ModalityConfig).
MODALITY_UNSPECIFIED = 0
_VALID_MODALITIES = {1, 2, 3}
_IMAGE_MODALITIES = {1, 3}  # BOTH, IMAGE_ONLY
_TEXT_MODALITIES = {1, 2}  # BOTH, TEXT_ONLY

# A client whose update is in is needed again the moment the round commits, so it polls
# faster than the base interval (else every round waits up to one poll interval for the
# last client to notice it); the fleet's total rate of such polls stays bounded.
_FINISHING_POLL_MIN_MS = 100
_FINISHING_POLLS_PER_S = 100
# A participant's heartbeat during its round's commit is held until the commit ends (at most
# this long), so the next round reaches it at once rather than one poll later; one held call
# per client and at most _MAX_COMMIT_WAITERS in all, so no client can tie up the RPC threads.
COMMIT_WAIT_S = 2.0
_MAX_COMMIT_WAITERS = 16


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
    instructions: RoundInstructions = PLAIN  # the strategy's asks of the round


@dataclass(frozen=True)
class Registration:
    """What Register returns (RegisterResponse without transport fields)."""

    client_id: str
    run_id: str
    current_round: int
    heartbeat_interval_ms: int


def holds_images(client: ClientRecord) -> bool:
    """Whether a client registered rows with an image."""
    if client.num_paired or client.num_image_only or client.num_text_only:
        return client.num_paired + client.num_image_only > 0
    return client.modality in _IMAGE_MODALITIES


def holds_text(client: ClientRecord) -> bool:
    """Whether a client registered rows with text."""
    if client.num_paired or client.num_image_only or client.num_text_only:
        return client.num_paired + client.num_text_only > 0
    return client.modality in _TEXT_MODALITIES


def new_client_id() -> str:
    """A fresh id for an unauthenticated (insecure-mode) client that sent none."""
    return f"client-{uuid.uuid4().hex[:12]}"


def load_prototypes(payload: bytes) -> dict[str, torch.Tensor]:
    """Decode a global-prototypes payload (for tests and clients)."""
    try:
        return decode_tensors(payload)
    except WireError as exc:
        raise InvalidUpdateError(f"prototypes payload is corrupt: {exc}") from exc


class RoundEngine:
    """Network-free federated-run state machine over a `StateStore` and `CheckpointStore`.

    Thread-safe: every public method takes the board's one lock; heavy per-upload work
    (validation) runs outside it, and so does a round's commit (aggregate, server step,
    checkpoint fsync): it runs on a committer thread of its own (``commit_inline``: on the
    caller, after the lock is released; deterministic, for tests). Call `tick()` periodically
    (the server does, every ~0.5 s) so deadlines fire; `wait_idle` waits for a pending commit.
    Uploads go through ``engine.uploads``, projections through ``engine.projection_exchange``,
    model downloads through ``engine.downloads``.
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
        commit_wait_s: float = COMMIT_WAIT_S,
    ) -> None:
        self.store = store
        self.commit_wait_s = commit_wait_s
        self._commit_waiters: set[str] = set()
        self.checkpoints = checkpoints
        self.strategy: Strategy = strategy or FedAvg()
        self.commit_inline = commit_inline
        self.contract = contract
        self.sd_requirement = sd_requirement
        self.update_bound = update_bound
        self.calibration = calibration
        self.module_of = module_of
        self.projection_spec = projection_spec
        self.model_config_digest = model_config_digest
        # without one: exact projections taken (rows bounded), no epsilon accounted
        self.projection_privacy = projection_privacy or ProjectionPrivacy(None, PrivacyLedger(None))
        self.clock = clock
        self._spec = spec_of_state(initial_state)
        events = EventLog(store, clock, threading.RLock())
        self.events_changed = events.changed

        def event(kind: str, round_no: int, message: str) -> None:
            events.append(kind, round_no=round_no, message=message)

        run = load_or_create_run(store, checkpoints, policy, initial_state, clock(), event)
        self.board = RoundBoard(
            store,
            events,
            run,
            checkpoints.load_checked(run.last_committed_round, self._spec),
            policy,
            epsilon_budget,
        )
        self.registry = ClientRegistry(store, lambda: self.board.policy.client_timeout_s)
        self.lifecycle = RunLifecycle(self.board, self.registry, calibration is not None)
        projections = ProjectionDesk(projection_spec, self.projection_privacy, noise_hook)
        projections.load_published(checkpoints, run.last_committed_round)
        committer = RoundCommitter(self.strategy, checkpoints, self._spec)
        try:
            committer.load_state(run.last_committed_round)
        except ValueError as exc:  # e.g. fedadam's moments offered to fedavg after a restart
            raise ConfigurationError(
                f"strategy {self.strategy.name!r} cannot resume this run: the state saved with "
                f"round {run.last_committed_round} does not fit it ({exc}). Start with "
                "the strategy the run was started with, or use a new state directory"
            ) from exc
        self.commits = CommitPipeline(
            self.board,
            self.lifecycle,
            self.registry,
            committer,
            projections,
            self.strategy,
            bundles,
            central_dp_delta,
        )
        self.uploads = RoundUploads(
            self.board,
            self.registry,
            self._spec,
            module_of,
            update_bound,
            on_counted=self.tick,
            min_clients=lambda: self.board.policy.min_clients,
        )
        self.projection_exchange = ProjectionIntake(self.board, self.registry, projections)
        self.downloads = ModelDownloads(self.board, checkpoints)
        self._commit_started = False
        fail_interrupted_rounds(store, clock(), event)
        self.registry.reset_after_restart()

    # ------------------------------------------------------------------ public: queries
    @property
    def policy(self) -> RoundPolicy:
        """The round policy in force (the admin's live config swaps it)."""
        return self.board.policy

    @property
    def epsilon_budget(self) -> float:
        """The per-client projection-DP epsilon budget (0: none; the admin may change it)."""
        return self.board.epsilon_budget

    @epsilon_budget.setter
    def epsilon_budget(self, budget: float) -> None:
        with self.board.lock:
            self.board.epsilon_budget = budget

    @property
    def bundles(self) -> BundleStore | None:
        """Where each committed round's model bundle is written (None: not written)."""
        return self.commits.bundles

    @property
    def run(self) -> RunRecord:
        """A copy of the run record."""
        with self.board.lock:
            return self.lifecycle.snapshot()

    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        """The current global model (version = last committed round)."""
        with self.board.lock:
            return dict(self.board.global_model)

    @property
    def open_round(self) -> RoundRecord | None:
        """The open round attempt, if any (a copy)."""
        with self.board.lock:
            opened = self.board.open
            if opened is None:
                return None
            return RoundRecord(**{**vars(opened.record), "selected": list(opened.record.selected)})

    def clients(self) -> list[ClientRecord]:
        """All clients with state 'offline' substituted for silent ones."""
        with self.board.lock:
            return self.registry.snapshot(self.clock())

    def is_calibration_round(self, round_no: int) -> bool:
        """Whether ``round_no`` is the run's calibration round (none without calibration)."""
        return self.lifecycle.is_calibration_round(round_no)

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
            self.board.events.append("client_refused", client_id=client_id, message=str(exc))
            raise
        with self.board.lock:
            self.registry.recovery_of[client_id] = recovery
            now = self.board.clock()
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
                self.board.events.append(
                    "client_registered",
                    client_id=client_id,
                    values={
                        "num_samples": float(num_samples),
                        "modality": float(modality),
                        "stable_diffusion": float(recovery != RECOVERY_FEATURE),
                    },
                )
            opened = self.board.open
            current = opened.record.round if opened else self.lifecycle.next_round()
            return Registration(
                client_id, self.board.run.run_id, current, self.policy.heartbeat_interval_ms
            )

    def heartbeat(self, client_id: str) -> NextAction:
        """Liveness + what to do now: TRAIN a round, WAIT, DONE, or REGISTER again."""
        board = self.board
        with board.lock:
            client = self.registry.get(client_id)
            poll = self.policy.poll_after_ms
            if client is None or client.state == CLIENT_REMOVED:
                return NextAction(
                    ACTION_REGISTER,
                    poll_after_ms=poll,
                    run_state=board.run.state,
                    message="this server does not know you; register again",
                )
            self.registry.touch(client, board.clock())
            self._tick_locked()
        self._commit_pending_inline()
        with board.lock:
            run = board.run
            closing = board.closing
            if (
                closing is not None
                and client_id in closing.attempt.uploaders
                and self._await_commit_locked(client_id)
            ):
                self._tick_locked()  # the commit ended: open the next round for this answer
                run, closing = board.run, board.closing
            if closing is not None and run.state not in TERMINAL_RUN_STATES:
                record = closing.attempt.record
                if client_id in closing.attempt.uploaders:
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
            opened = board.open
            if opened is not None and client_id in opened.record.selected:
                if client_id not in opened.uploaders:
                    record = opened.record
                    return NextAction(
                        opened.action,
                        round=record.round,
                        attempt=record.attempt,
                        poll_after_ms=poll,
                        deadline_unix_s=record.deadline_unix_s,
                        local_epochs=0 if opened.is_calibration else self.policy.local_epochs,
                        run_state=run.state,
                        message=f"{opened.verb} {record.round} (attempt {record.attempt})",
                        instructions=opened.asks,
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
        with self.board.lock:
            client = self.registry.get(client_id)
            if client is None or client.state == CLIENT_REMOVED:
                return False
            client.state = CLIENT_REMOVED
            self.registry.save(client)
            self.board.events.append("client_removed", client_id=client_id)
            return True

    def require_known(self, client_id: str) -> None:
        """Raise `UnknownClientError` unless ``client_id`` is registered (marks it alive)."""
        with self.board.lock:
            self.registry.touch(self.registry.known(client_id), self.clock())

    def record_event(
        self, kind: str, round_no: int = 0, client_id: str = "", message: str = ""
    ) -> None:
        """Log an event that happened outside the engine (e.g. enrollment)."""
        self.board.events.append(kind, round_no, client_id, message)

    # ------------------------------------------------------------------ public: run control
    def start(self) -> RunRecord:
        """Start an idle run (or resume a paused one)."""
        with self.board.lock:
            return self.lifecycle.start()

    def pause(self, reason: str = "") -> RunRecord:
        """No new rounds start; an open round runs to its end."""
        with self.board.lock:
            return self.lifecycle.pause(reason)

    def resume(self, reason: str = "") -> RunRecord:
        """Resume a paused run (only a paused one: anything else is a precondition error)."""
        with self.board.lock:
            return self.lifecycle.resume(reason)

    def update_policy(self, policy: RoundPolicy) -> RunRecord:
        """Swap in a new round policy (admin live config); ``policy.total_rounds`` becomes the
        run's total. Deadlines of an already open round are kept; the next round uses it."""
        board = self.board
        with board.lock:
            run = board.run
            last = run.last_committed_round
            if policy.total_rounds < last:
                raise RunNotActiveError(
                    f"rounds={policy.total_rounds} is below the {last} round(s) already committed"
                )
            before = vars(board.policy)
            changed = {k: v for k, v in vars(policy).items() if before.get(k) != v}
            if run.total_rounds != policy.total_rounds:
                # the database first: if it refuses, memory keeps the old policy too
                board.store.put_run(replace(run, total_rounds=policy.total_rounds))
                run.total_rounds = policy.total_rounds
            board.policy = policy
            message = " ".join(f"{k}={v}" for k, v in changed.items()) or "no change"
            board.events.append("policy_updated", round_no=last, message=message)
            opened = board.open
            if opened is not None and opened.is_calibration != self.is_calibration_round(
                opened.record.round
            ):
                # the open round changed kind (calibration <-> training): drop it uncounted,
                # the next tick opens the right one from the same input model
                opened.record.counts_as_retry = False
                self._fail_open_locked(
                    f"rounds changed to {policy.total_rounds} while round "
                    f"{opened.record.round} was open; it is re-run as a "
                    f"{'training' if opened.is_calibration else 'calibration'} round",
                    retry=False,
                )
            return self.lifecycle.snapshot()

    def stop(self, reason: str = "") -> RunRecord:
        """End the run now; an open round is failed and clients are told DONE."""
        with self.board.lock:
            if self.board.run.state not in TERMINAL_RUN_STATES:
                if self.board.open is not None:
                    self._fail_open_locked(f"run stopped: {reason or 'by operator'}", retry=False)
                self.lifecycle.set_state(RUN_STOPPED, reason or "stopped by operator")
            return self.lifecycle.snapshot()

    # ------------------------------------------------------------------ time-driven transitions
    def tick(self) -> None:
        """Advance the state machine: open, close (commit/fail) rounds as time passes."""
        with self.board.lock:
            self._tick_locked()
        self._commit_pending_inline()

    def _tick_locked(self) -> None:
        board = self.board
        run = board.run
        policy = board.policy
        if board.closing is not None:  # nothing moves until the closing round's commit ends
            return
        # a paused run still closes its open round (commit/fail); it only opens no new one
        if run.state != RUN_RUNNING and not (run.state == RUN_PAUSED and board.open is not None):
            return
        self.lifecycle.complete_if_final(f"all {run.total_rounds} rounds committed")
        if run.state in TERMINAL_RUN_STATES:
            return
        now = self.clock()
        opened = board.open
        if opened is None:
            self._open_when_enough_locked(now)
            return
        received = len(opened.uploaders)
        selected = len(opened.record.selected)
        needed = opened.min_uploads(policy.min_clients)
        if received >= selected:
            self._close_locked("every selected client uploaded")
        elif policy.straggler_fraction < 1.0 and policy.enough_to_close(received, selected):
            self._close_locked(
                f"straggler cut-off: {received}/{selected} uploaded "
                f"(straggler_fraction={policy.straggler_fraction:g})"
            )
        elif (
            received >= needed
            and policy.wait_after_min_s is not None
            and opened.min_reached_at is not None
            and now - opened.min_reached_at >= policy.wait_after_min_s
        ):
            self._close_locked(
                f"straggler cut-off: {received}/{selected} uploaded, "
                f"{policy.wait_after_min_s:g} s after min_clients was reached"
            )
        elif now >= opened.record.deadline_unix_s:
            if received >= needed:
                self._close_locked(f"deadline: {received}/{selected} uploaded")
            else:
                why = (
                    f"min_clients is {needed}"
                    if needed == policy.min_clients
                    else f"{needed} needed (every selected client)"
                )
                self._fail_open_locked(
                    f"deadline passed with {received} upload(s); {why}", retry=True
                )

    def _open_when_enough_locked(self, now: float) -> None:
        """Open the next attempt once min_clients are online; fail it after start_timeout_s.
        The calibration round selects every online client holding rows of a calibrated
        path's modality (none: the run completes with the last training round's model,
        uncalibrated)."""
        policy = self.board.policy
        lifecycle = self.lifecycle
        available = self.registry.online_ids(now)
        if len(available) < policy.min_clients:
            if lifecycle.waiting_since is None:
                lifecycle.waiting_since = now
            elif now - lifecycle.waiting_since >= policy.start_timeout_s:
                lifecycle.record_start_failure(
                    len(available), policy.min_clients, policy.start_timeout_s
                )
            return
        if not lifecycle.is_calibration_round(lifecycle.next_round()):
            self._open_round_locked(available, now)
            return
        step = self.calibration
        assert step is not None  # a calibration round exists only with a step
        records = self.registry.records
        holders = sorted(
            cid
            for cid in available
            if step.wants(holds_images(records[cid]), holds_text(records[cid]))
        )
        if not holders:
            lifecycle.skip_calibration(
                f"none of the {len(available)} online client(s) holds rows the calibrated "
                f"paths ({', '.join(step.paths)}) need"
            )
            return
        self._open_round_locked(holders, now)

    def _open_round_locked(self, eligible: list[str], now: float) -> None:
        """Open a new attempt of the next round (a calibration one selects all ``eligible``)."""
        board = self.board
        round_no = self.lifecycle.next_round()
        attempt_no = self.lifecycle.next_attempt(round_no)
        calibration = self.lifecycle.is_calibration_round(round_no)
        selected = eligible if calibration else board.policy.select(eligible, round_no, attempt_no)
        record = RoundRecord(
            round=round_no,
            attempt=attempt_no,
            state=ROUND_OPEN,
            started_unix_s=now,
            deadline_unix_s=now + board.policy.round_deadline_s,
            selected=selected,
        )
        board.store.put_round(record)
        board.open = self._new_attempt(record, len(eligible))
        self.lifecycle.waiting_since = None
        for cid in selected:
            client = self.registry.records[cid]
            client.state = CLIENT_SELECTED
            self.registry.save(client)
        kind = "calibration, " if calibration else ""
        board.events.append(
            "round_started",
            round_no=round_no,
            message=f"{kind}attempt {attempt_no}: selected {len(selected)} of {len(eligible)} "
            + ("online holding calibration rows" if calibration else "online"),
            values={"attempt": float(attempt_no), "selected": float(len(selected))},
        )

    def _new_attempt(self, record: RoundRecord, eligible: int) -> Attempt:
        """A calibration or a training attempt (the strategy's aggregator and instructions;
        central DP learns the round's sampling rate, selected / eligible, for its epsilon)."""
        if self.calibration is not None and self.lifecycle.is_calibration_round(record.round):
            privacy, board = self.projection_privacy, self.board
            return CalibrationAttempt(
                record=record,
                step=self.calibration,
                admit_release=lambda cid, metrics, rows: privacy.admit_calibration(
                    cid, metrics, rows, board.epsilon_budget
                ),
            )
        global_model = self.board.global_model
        aggregator = self.strategy.begin_round(global_model, self.module_of)
        if isinstance(aggregator, CentralDPAggregator):
            aggregator.sample_rate = len(record.selected) / max(eligible, 1)
        return TrainingAttempt(
            record=record,
            aggregator=aggregator,
            instructions=self.strategy.configure_round(record.round),
            bounder=UpdateBounder(global_model, self.update_bound) if self.update_bound else None,
        )

    def _fail_open_locked(self, message: str, retry: bool) -> None:
        """End the open attempt as failed (see `RunLifecycle.fail_attempt`)."""
        opened, self.board.open = self.board.open, None
        assert opened is not None
        self.lifecycle.fail_attempt(opened, message, retry)

    # ------------------------------------------------------------------ commit hand-off
    def _close_locked(self, reason: str) -> None:
        """The open attempt takes no more uploads; its commit runs off this thread (or, with
        ``commit_inline``, on the caller once it released the lock)."""
        board = self.board
        assert board.open is not None and board.closing is None
        board.closing = Closing(board.open, reason)
        board.open = None
        # the serialized input model is not needed any more (a late download reloads it from
        # its checkpoint): dropping it first keeps the commit's peak memory lower
        board.global_bytes = None
        self._commit_started = not self.commit_inline
        if not self.commit_inline:
            threading.Thread(target=self.commits.run, name="round-commit", daemon=True).start()

    def _await_commit_locked(self, client_id: str) -> bool:
        """Hold a participant's heartbeat until the closing commit ends (bounded; see
        COMMIT_WAIT_S); True if it ended. Called with the board's lock held."""
        board = self.board
        if client_id in self._commit_waiters or len(self._commit_waiters) >= _MAX_COMMIT_WAITERS:
            return False
        self._commit_waiters.add(client_id)
        try:
            return board.idle.wait_for(lambda: board.closing is None, self.commit_wait_s)
        finally:
            self._commit_waiters.discard(client_id)

    def _commit_pending_inline(self) -> None:
        """Run a commit left by a public method (``commit_inline``), outside the lock."""
        with self.board.lock:
            if self.board.closing is None or self._commit_started:
                return
            self._commit_started = True
        self.commits.run()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no commit is pending; False if one still is after ``timeout`` s."""
        with self.board.lock:
            return self.board.idle.wait_for(lambda: self.board.closing is None, timeout)
