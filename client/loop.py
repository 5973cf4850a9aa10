"""The client daemon's state machine: register -> heartbeat -> download -> train -> exchange
projections (eq. 16) -> upload -> heartbeat ..., with every network step retried under one
backoff policy. Projections go before the upload because the server only takes them while the
round is open, and the last upload closes it. A calibration round (ACTION_CALIBRATE, after the
last training round) runs the same steps with statistics in place of training and no exchange.
It talks to the server only through a CoordinatorTransport and to the model only through a
RoundWorker, so it is unit-tested with fakes of both."""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from crossfed.client.backoff import Backoff, RetryPolicy
from crossfed.client.errors import (
    AlreadyUploadedError,
    FatalServerError,
    NotRegisteredError,
    PayloadIntegrityError,
    RoundAbandonedError,
    ServerUnreachableError,
    TransientTransportError,
)
from crossfed.client.model_download import DownloadProgress, download_buffer_pool
from crossfed.client.transport import CoordinatorTransport
from crossfed.client.update_upload import (
    EncryptorFactory,
    LocalUpdate,
    PreparedUpload,
    prepare_upload,
)
from crossfed.common.model.encoder_identity import EncoderIdentity
from crossfed.common.privacy.projection_dp import (
    ProjectionDPError,
    ProjectionDPParams,
    ProjectionMandate,
)
from crossfed.common.round_instructions import LIMITS, PLAIN, RoundInstructions, out_of_range
from crossfed.v1 import common_pb2, coordinator_pb2

log = logging.getLogger(__name__)

DAEMON_VERSION = "0.1.0"


class Phase(enum.Enum):
    """Where the loop is; a failed step resumes from here."""

    REGISTER = "register"
    HEARTBEAT = "heartbeat"
    DOWNLOAD = "download"
    TRAIN = "train"
    EXCHANGE = "exchange"
    UPLOAD = "upload"
    DONE = "done"


@dataclass(frozen=True)
class Registration:
    """What the client announces in Register."""

    modality: int  # crossfed.v1.ModalityConfig value
    num_samples: int
    num_paired: int
    num_text_only: int
    num_image_only: int
    model_config_digest: str = ""
    class_names: tuple[str, ...] = ()  # an explicit class list (built-in data, --classes)
    label_names: tuple[str, ...] = ()  # else the labels a manifest holds
    text_encoder: EncoderIdentity | None = None
    image_encoder: EncoderIdentity | None = None
    sd_checkpoint_digest: str = ""  # the SD checkpoint this client recovers with ("" none)


@dataclass(frozen=True)
class Registered:
    """What the server answered to Register."""

    client_id: str
    run_id: str
    current_round: int
    model_config_json: str
    heartbeat_interval_s: float
    chunk_size: int
    class_names: tuple[str, ...] = ()  # the federation's classes in index order
    # the projection noise the server requires (None: it takes exact projections)
    projection_privacy: ProjectionMandate | None = None


@dataclass(frozen=True)
class ProjectionUpload:
    """Per-class projections of f_t and f_i (eq. 16), already clipped+noised if DP is on."""

    payload: bytes  # safetensors bytes
    epsilon_spent: float = 0.0
    mechanism: ProjectionDPParams | None = None  # the clip and noise applied (None: none)


def instructions_of(response: coordinator_pb2.HeartbeatResponse) -> RoundInstructions:
    """What the server's strategy asks of this round's training; a value no strategy sends
    (negative, not finite, over its limit) is logged and ignored: training goes on without
    that part."""
    asked = {name: float(getattr(response, name)) for name in LIMITS}
    for name, value in asked.items():
        if out_of_range(name, value):
            log.error(
                "the server sent %s=%r for round %d; training without it",
                name,
                value,
                response.round,
            )
            asked[name] = 0.0
    return RoundInstructions(**asked)


def projection_mandate(message: coordinator_pb2.ProjectionPrivacy) -> ProjectionMandate | None:
    """The server's projection-privacy mandate from a RegisterResponse (None: not required)."""
    if not message.required:
        return None
    try:
        return ProjectionMandate(
            float(message.noise_multiplier),
            float(message.clip_norm),
            float(message.delta),
            float(message.epsilon_budget) or None,
        )
    except ProjectionDPError as exc:
        raise FatalServerError(
            f"the server's projection privacy mandate is invalid: {exc}"
        ) from exc


class RoundWorker(Protocol):
    """The model side of a round (implemented by the daemon over the real network)."""

    def registration(self) -> Registration:
        """Modality and data-size facts for Register."""

    def on_registered(self, registered: Registered) -> None:
        """Learn the server's answer (e.g. its ModelConfig when the client has none)."""

    def load_global(self, round_id: int, payload: bytes | memoryview) -> None:
        """Load the downloaded global weights (safetensors bytes; a read-only view of the
        download buffer, valid as long as it is referenced)."""

    def train(
        self,
        round_id: int,
        local_epochs: int | None,
        instructions: RoundInstructions = PLAIN,
    ) -> LocalUpdate:
        """Train locally (with the last global prototypes) and serialize the update, doing
        what the server's strategy asks (FedProx's mu, FedLC's tau)."""

    def calibration_stats(self, round_id: int) -> LocalUpdate:
        """The calibration round's upload: statistics of the loaded (final) global model on
        the local data (server/calibration_round.py), num_samples = the rows they cover."""

    def projections(self, round_id: int) -> ProjectionUpload | None:
        """Local per-class projections to exchange, or None to skip the exchange."""

    def receive_prototypes(self, round_id: int, payload: bytes) -> None:
        """Keep the server's global prototypes for the next train()."""


@dataclass(frozen=True)
class RoundReport:
    """One line per completed round, for the CLI and tests."""

    round_id: int
    metrics: dict[str, float]
    bytes_up: int
    bytes_down: int
    seconds: float
    duplicate: bool
    encrypted: bool
    calibration: bool = False  # the calibration round after training (statistics, no training)


@dataclass
class LoopStats:
    """Counters over the loop's life, for tests and the final summary."""

    rounds_completed: list[int] = field(default_factory=list)
    transient_failures: int = 0
    abandoned_rounds: int = 0
    rejected_uploads: int = 0
    registrations: int = 0
    download_starts: list[tuple[int, int]] = field(default_factory=list)  # (round, start_chunk)
    upload_attempts: list[tuple[int, str]] = field(default_factory=list)  # (round, upload_id)
    resent_rounds: list[int] = field(default_factory=list)  # TRAIN again after a counted upload


@dataclass
class _RoundState:
    """Work in progress for one round; survives transient failures, dropped on abandon."""

    round_id: int
    server_public_key: bytes
    local_epochs: int | None
    started: float
    download: DownloadProgress
    upload_id: str
    calibrate: bool = False  # ACTION_CALIBRATE: statistics instead of training, no exchange
    instructions: RoundInstructions = PLAIN  # the server strategy's asks
    update: LocalUpdate | None = None
    prepared: PreparedUpload | None = None
    projections: ProjectionUpload | None = None
    rejected_key: bytes | None = None  # upload key in use when the server refused our upload
    bytes_up: int = 0
    duplicate: bool = False


@dataclass(frozen=True)
class LoopSettings:
    """Tunables of the loop (not of the transport)."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    default_poll_s: float = 1.0
    max_poll_s: float = 30.0
    chunk_size: int = 1024 * 1024
    max_integrity_failures: int = 3
    download_buffer_idle_s: float = 600.0  # keep the model download buffer warm (0: never)


class ClientLoop:
    """Drive one client through the federation until the server says the run is done."""

    def __init__(
        self,
        transport: CoordinatorTransport,
        worker: RoundWorker,
        settings: LoopSettings | None = None,
        *,
        client_id: str | None = None,
        encryptor_factory: EncryptorFactory | None = None,
        backoff: Backoff | None = None,
        stop_event: threading.Event | None = None,
        sleep: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_round: Callable[[RoundReport], None] | None = None,
    ) -> None:
        self.transport = transport
        self.worker = worker
        self.settings = settings or LoopSettings()
        self.client_id = client_id or ""
        self.encryptor_factory = encryptor_factory
        self.backoff = backoff or Backoff(self.settings.retry)
        self.stop_event = stop_event or threading.Event()
        self._sleep = sleep or self._interruptible_sleep
        self._clock = clock
        self._on_round = on_round
        self.phase = Phase.REGISTER
        self.stats = LoopStats()
        self.last_completed_round: int | None = None
        self._last_upload: _RoundState | None = None
        self.run_id = ""
        self._chunk_size = self.settings.chunk_size
        self._poll_s = self.settings.default_poll_s
        self._round: _RoundState | None = None
        self._upload_ids: dict[int, str] = {}
        self._integrity_failures = 0
        self._download_buffers = download_buffer_pool(self.settings.download_buffer_idle_s)

    # -- driving --------------------------------------------------------------------------

    def run(self) -> LoopStats:
        """Run until ACTION_DONE (or stop_event); raise ServerUnreachableError when the retry
        policy gives up."""
        if self.client_id:
            self.transport.set_client_id(self.client_id)
        while self.phase is not Phase.DONE and not self.stop_event.is_set():
            self.step()
        return self.stats

    def step(self) -> None:
        """Run the current phase once, applying the failure policy."""
        started = self._clock()
        try:
            self._dispatch()
            self.backoff.reset()
        except TransientTransportError as exc:
            self.stats.transient_failures += 1
            self.backoff.record_wait(self._clock() - started)
            if self.backoff.exhausted:
                raise ServerUnreachableError(
                    f"server unreachable for {self.backoff.failing_for_s:.0f}s (last error: {exc})"
                ) from exc
            delay = self.backoff.next_delay()
            log.warning("%s failed (%s); retrying in %.2fs", self.phase.value, exc, delay)
            self.backoff.record_wait(delay)
            self._sleep(delay)  # then the same phase again, with its progress kept
        except RoundAbandonedError as exc:
            log.warning("round abandoned: %s", exc)
            self._abandon_round()
            self._sleep(self._poll_s)  # never spin on a server that keeps refusing
        except NotRegisteredError as exc:
            log.warning("server does not know this client (%s); registering again", exc)
            self._round = None
            self.phase = Phase.REGISTER
            self._sleep(self._poll_s)

    def _dispatch(self) -> None:
        handlers: dict[Phase, Callable[[], None]] = {
            Phase.REGISTER: self._register,
            Phase.HEARTBEAT: self._heartbeat,
            Phase.DOWNLOAD: self._download,
            Phase.TRAIN: self._train,
            Phase.EXCHANGE: self._exchange,
            Phase.UPLOAD: self._upload,
        }
        handlers[self.phase]()

    def _abandon_round(self) -> None:
        if self._round is not None:
            self.stats.abandoned_rounds += 1
        self._round = None
        if self.phase is not Phase.REGISTER:
            self.phase = Phase.HEARTBEAT

    def _interruptible_sleep(self, seconds: float) -> None:
        self.stop_event.wait(seconds)

    # -- phases ---------------------------------------------------------------------------

    def _register(self) -> None:
        info = self.worker.registration()
        try:
            response = self._send_registration(info)
        except RoundAbandonedError as exc:
            # FAILED_PRECONDITION on Register: the run cannot admit this client as it is
            # (model config, classes, encoders, Stable Diffusion checkpoint); no retry changes
            # that.
            raise FatalServerError(f"the server refused this client: {exc}") from exc
        self._registered(response)

    def _send_registration(self, info: Registration) -> coordinator_pb2.RegisterResponse:
        request = coordinator_pb2.RegisterRequest(
            modality=info.modality,  # type: ignore[arg-type]
            num_samples=info.num_samples,
            num_paired=info.num_paired,
            num_text_only=info.num_text_only,
            num_image_only=info.num_image_only,
            model_config_digest=info.model_config_digest,
            daemon_version=DAEMON_VERSION,
            class_names=info.class_names,
            label_names=info.label_names,
            sd_checkpoint_digest=info.sd_checkpoint_digest,
        )
        if info.text_encoder is not None:
            request.text_encoder.CopyFrom(info.text_encoder.to_proto())
        if info.image_encoder is not None:
            request.image_encoder.CopyFrom(info.image_encoder.to_proto())
        return self.transport.register(request)

    def _registered(self, response: coordinator_pb2.RegisterResponse) -> None:
        self.stats.registrations += 1
        if response.client_id:
            self.client_id = response.client_id
            self.transport.set_client_id(response.client_id)
        if self.run_id and response.run_id != self.run_id:
            # A new run (server state reset): round numbers start over, nothing carries over.
            log.warning("server started a new run %s (was %s)", response.run_id, self.run_id)
            self._last_upload = None
            self._upload_ids = {}
            self.last_completed_round = None
        self.run_id = response.run_id
        if response.chunk_size:
            self._chunk_size = int(response.chunk_size)
        if response.heartbeat_interval_ms:
            self._poll_s = response.heartbeat_interval_ms / 1000.0
        self.worker.on_registered(
            Registered(
                client_id=self.client_id,
                run_id=response.run_id,
                current_round=int(response.current_round),
                model_config_json=response.model_config_json,
                heartbeat_interval_s=self._poll_s,
                chunk_size=self._chunk_size,
                class_names=tuple(response.class_names),
                projection_privacy=(
                    projection_mandate(response.projection_privacy)
                    if response.HasField("projection_privacy")
                    else None
                ),
            )
        )
        log.info("registered as %s (run %s)", self.client_id, self.run_id)
        self.phase = Phase.HEARTBEAT

    def _wait(self, poll_after_ms: int) -> None:
        seconds = poll_after_ms / 1000.0 if poll_after_ms else self._poll_s
        self._sleep(min(max(seconds, 0.0), self.settings.max_poll_s))

    def _heartbeat(self) -> None:
        response = self.transport.heartbeat(
            coordinator_pb2.HeartbeatRequest(last_completed_round=self.last_completed_round or 0)
        )
        action = response.action
        if action == coordinator_pb2.ACTION_DONE:
            log.info("server ended the run: %s", response.message or response.run_state)
            self._round = None
            self.phase = Phase.DONE
            return
        if action == coordinator_pb2.ACTION_REGISTER:
            self._round = None
            self.phase = Phase.REGISTER
            return
        if action in (coordinator_pb2.ACTION_TRAIN, coordinator_pb2.ACTION_CALIBRATE):
            self._begin_or_resume_round(response)
            return
        # ACTION_WAIT (or unknown): any half-done round is no longer wanted.
        if self._round is not None:
            log.info("server says wait; dropping round %d", self._round.round_id)
            self._abandon_round()
        self._wait(response.poll_after_ms)

    def _begin_or_resume_round(self, response: coordinator_pb2.HeartbeatResponse) -> None:
        round_id = int(response.round)
        calibrate = response.action == coordinator_pb2.ACTION_CALIBRATE
        key = bytes(response.upload_public_key)
        last = self._last_upload
        if self._round is None and last is not None and last.round_id == round_id:
            # The server voided our counted upload (failed attempt, restart): it never says
            # TRAIN for an upload it counted, so resend the same update (same upload_id).
            log.info("server asks for round %d again; resending the same update", round_id)
            self.stats.resent_rounds.append(round_id)
            self._round = _RoundState(
                round_id=round_id,
                server_public_key=key,
                local_epochs=last.local_epochs,
                started=self._clock(),
                download=DownloadProgress(round_id, buffer_pool=self._download_buffers),
                upload_id=last.upload_id,
                calibrate=calibrate,
                update=last.update,
                projections=ProjectionUpload(b""),
            )
            self.phase = Phase.UPLOAD
            return
        current = self._round
        if (
            current is not None
            and current.round_id == round_id
            and current.rejected_key is not None
            and current.rejected_key != key
        ):
            # The server rotated its upload key (e.g. it restarted): re-encrypt the same
            # update under the same upload_id.
            current.prepared = None
            current.rejected_key = None
            current.server_public_key = key
            self.phase = Phase.UPLOAD
            return
        if current is not None:
            self.stats.abandoned_rounds += 1
        upload_id = self._upload_ids.setdefault(round_id, uuid.uuid4().hex)
        self._upload_ids = {round_id: upload_id}
        self._round = _RoundState(
            round_id=round_id,
            server_public_key=key,
            local_epochs=int(response.local_epochs) or None,
            started=self._clock(),
            instructions=instructions_of(response),
            download=DownloadProgress(round_id, buffer_pool=self._download_buffers),
            upload_id=upload_id,
            calibrate=calibrate,
        )
        self._integrity_failures = 0
        self.phase = Phase.DOWNLOAD

    def _require_round(self) -> _RoundState:
        if self._round is None:
            raise RoundAbandonedError(f"no round in progress during {self.phase.value}")
        return self._round

    def _download(self) -> None:
        state = self._require_round()
        progress = state.download
        self.stats.download_starts.append((state.round_id, progress.next_chunk))
        request = coordinator_pb2.DownloadRequest(
            round=state.round_id, start_chunk=progress.next_chunk
        )
        try:
            for chunk in self.transport.download(request):
                progress.add(chunk)
                self.backoff.reset()  # progress made: the connection is healthy
            if not progress.complete:
                raise TransientTransportError(
                    f"download of round {state.round_id} ended early at chunk "
                    f"{progress.next_chunk}/{progress.total}"
                )
            payload = progress.payload(writable=True)  # decoded in place by the worker
        except PayloadIntegrityError as exc:
            progress.reset()
            self._integrity_failures += 1
            if self._integrity_failures >= self.settings.max_integrity_failures:
                raise RoundAbandonedError(
                    f"global model of round {state.round_id} failed verification "
                    f"{self._integrity_failures} times: {exc}"
                ) from exc
            raise TransientTransportError(f"download integrity: {exc}") from exc
        self.worker.load_global(state.round_id, payload)
        self.phase = Phase.TRAIN

    def _train(self) -> None:
        state = self._require_round()
        if state.calibrate:
            state.update = self.worker.calibration_stats(state.round_id)
            self.phase = Phase.UPLOAD
            return
        state.update = self.worker.train(state.round_id, state.local_epochs, state.instructions)
        self.phase = Phase.EXCHANGE

    def _upload(self) -> None:
        state = self._require_round()
        if state.update is None:
            self.phase = Phase.TRAIN
            return
        if state.prepared is None:
            state.prepared = prepare_upload(
                state.update,
                round_id=state.round_id,
                client_id=self.client_id,
                upload_id=state.upload_id,
                chunk_size=self._chunk_size,
                server_public_key=state.server_public_key,
                encryptor_factory=self.encryptor_factory,
            )
        self.stats.upload_attempts.append((state.round_id, state.upload_id))
        try:
            response = self.transport.upload(iter(state.prepared.messages))
        except AlreadyUploadedError as exc:
            # Counted already under an earlier upload_id (e.g. before a client restart).
            log.info("round %d: %s", state.round_id, exc)
            response = coordinator_pb2.UploadResponse(accepted=True, duplicate=True)
        state.bytes_up += state.prepared.wire_bytes
        if not response.accepted and not response.duplicate:
            # Ask the server what it wants: a rotated key means re-encrypt and resend; the
            # same round with the same key means this update is void (retrain); else move on.
            self.stats.rejected_uploads += 1
            log.warning(
                "server rejected the update for round %d: %s", state.round_id, response.message
            )
            state.rejected_key = state.server_public_key
            self.phase = Phase.HEARTBEAT
            return
        state.duplicate = bool(response.duplicate)
        self.last_completed_round = state.round_id
        self._last_upload = state
        self._finish_round(state)

    def _exchange(self) -> None:
        state = self._require_round()
        if state.projections is None:
            # Computed once per round: a retry must not draw (and spend) DP noise again.
            state.projections = self.worker.projections(state.round_id) or ProjectionUpload(b"")
        projections = state.projections
        if projections.payload:
            try:
                response = self.transport.exchange_projections(
                    coordinator_pb2.ProjectionExchangeRequest(
                        round=state.round_id,
                        projections=common_pb2.TensorPayload(
                            safetensors=projections.payload,
                            payload_sha256=hashlib.sha256(projections.payload).digest(),
                        ),
                        epsilon_spent=projections.epsilon_spent,
                        noise_multiplier=(
                            projections.mechanism.noise_multiplier if projections.mechanism else 0.0
                        ),
                        clip_norm=projections.mechanism.clip_norm if projections.mechanism else 0.0,
                    )
                )
            except RoundAbandonedError as exc:
                # Optional step: the upload decides whether the round still stands.
                log.warning("projection exchange of round %d refused: %s", state.round_id, exc)
            else:
                state.bytes_up += len(projections.payload)
                self._accept_prototypes(state, response)
        self.phase = Phase.UPLOAD

    def _accept_prototypes(
        self, state: _RoundState, response: coordinator_pb2.ProjectionExchangeResponse
    ) -> None:
        received = bytes(response.global_prototypes.safetensors)
        if not received:
            return
        state.download.bytes_received += len(received)
        digest = bytes(response.global_prototypes.payload_sha256)
        if digest and hashlib.sha256(received).digest() != digest:
            log.warning("global prototypes of round %d failed SHA-256; ignored", state.round_id)
            return
        self.worker.receive_prototypes(int(response.prototypes_round), received)

    def _finish_round(self, state: _RoundState) -> None:
        report = RoundReport(
            round_id=state.round_id,
            metrics={**state.update.metrics, **state.update.local_metrics} if state.update else {},
            bytes_up=state.bytes_up,
            bytes_down=state.download.bytes_received,
            seconds=self._clock() - state.started,
            duplicate=state.duplicate,
            encrypted=bool(state.prepared and state.prepared.encrypted),
            calibration=state.calibrate,
        )
        self.stats.rounds_completed.append(state.round_id)
        self._round = None
        self.phase = Phase.HEARTBEAT
        if self._on_round is not None:
            self._on_round(report)
