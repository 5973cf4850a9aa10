"""The Coordinator gRPC service: a thin shell that reads the caller's identity, converts
protobuf to plain values, calls the `RoundEngine`, and maps `ServerError`s to gRPC status
codes with their human-readable messages."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc
from crossfed.common.crypto.certificates import Role
from crossfed.common.crypto.identity import CredentialStore, EnrollmentError, enroll
from crossfed.common.crypto.peer_certificate import peer_certificate
from crossfed.common.privacy.projection_dp import ProjectionDPError, ProjectionDPParams
from crossfed.common.wire.chunk_stream import (
    BufferPool,
    ChunkFrame,
    tensor_chunk_prefix,
    upload_message_from_wire,
    wire_bytes,
)
from crossfed.common.wire.errors import WireError
from crossfed.common.wire.tensor_codec import decode_tensors
from crossfed.server.caller_identity import caller_client_id
from crossfed.server.errors import (
    InvalidUpdateError,
    PrivacyBudgetExceededError,
    PrivacyMandateError,
    ServerBusyError,
    ServerError,
    UnknownClientError,
    UploadCancelledError,
    WrongRoundError,
)
from crossfed.server.federation_contract import ClientFacts
from crossfed.server.round_engine import RoundEngine, new_client_id
from crossfed.server.round_uploads import UploadOutcome
from crossfed.server.upload_admission import SlotBuffers, UploadAdmission
from crossfed.server.upload_receiver import (
    UploadPolicy,
    check_header,
    receive_payload,
    upload_buffer_pool,
)
from crossfed.server.upload_streams import StreamWatch, UploadStreams
from crossfed.v1 import coordinator_pb2, coordinator_pb2_grpc
from google.protobuf.message_factory import GetMessageClass

log = logging.getLogger(__name__)


# upload failures the engine records as events itself (others the servicer records)
ENGINE_LOGGED = (
    InvalidUpdateError,
    PrivacyBudgetExceededError,
    PrivacyMandateError,
    UploadCancelledError,  # recorded as upload_stalled (or replaced by the newer stream)
)

# protobuf counts are uint64; the state DB (SQLite) stores int64: larger values are refused
# here, at the edge, instead of failing deep inside a DB write (an UNKNOWN status)
MAX_WIRE_INT = 2**63 - 1


def checked_count(value: int, what: str) -> int:
    """``value`` as int, or `InvalidUpdateError` when it exceeds what the server can store."""
    if value > MAX_WIRE_INT:
        raise InvalidUpdateError(f"{what} = {value} is out of range (max {MAX_WIRE_INT})")
    return int(value)


def abort_with(context: grpc.ServicerContext, exc: ServerError) -> NoReturn:
    """End the call with the status code the error class names and its message."""
    context.abort(getattr(grpc.StatusCode, exc.status.value), str(exc))
    raise AssertionError("unreachable: context.abort raises")


class CheckpointChangedError(Exception):
    """The checkpoint file being served ended early (it changed under its open handle)."""


def model_chunk_frames(
    fd: int, size: int, chunk_size: int, start: int, digest: bytes, round_no: int
) -> Iterator[bytes]:
    """Serialized ``TensorChunk`` messages of the file ``fd`` from chunk ``start`` on: each
    chunk is read straight behind its framing into a reused buffer, then copied once into the
    message gRPC sends (protobuf would copy it three times)."""
    total = max(1, -(-size // chunk_size))
    scratch = bytearray()
    for index in range(start, total):
        offset = index * chunk_size
        length = min(chunk_size, size - offset)
        prefix = tensor_chunk_prefix(index, total, length, digest, size, round_no)
        frame_len = len(prefix) + length
        if len(scratch) < frame_len:
            scratch = bytearray(frame_len)
        frame = memoryview(scratch)[:frame_len]
        frame[: len(prefix)] = prefix
        _read_exactly(fd, frame[len(prefix) :], offset)
        yield bytes(frame)


def _read_exactly(fd: int, out: memoryview, offset: int) -> None:
    """Fill ``out`` from ``fd`` at ``offset`` (short reads retried; EOF is an error)."""
    done = 0
    while done < len(out):
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [out[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, len(out) - done, offset + done)
            got = len(data)
            out[done : done + got] = data
        if got == 0:
            raise CheckpointChangedError(
                f"the model file ended at byte {offset + done}, expected {offset + len(out)}: "
                "it changed while being served; download again"
            )
        done += got


def add_coordinator_to_server(servicer: CoordinatorServicer, server: grpc.Server) -> None:
    """Register ``servicer`` like the generated ``add_CoordinatorServicer_to_server``, but
    with zero-copy framing for the two bulk streams: DownloadGlobalModel sends pre-serialized
    chunks, UploadUpdate reads chunk data as views of the received messages."""
    service = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request_type = GetMessageClass(method.input_type)
        response_type = GetMessageClass(method.output_type)
        deserialize: Callable[[bytes], object] = request_type.FromString
        serialize: Callable[[Any], bytes] = response_type.SerializeToString
        if method.name == "DownloadGlobalModel":
            serialize = wire_bytes
        elif method.name == "UploadUpdate":
            deserialize = upload_message_from_wire
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=deserialize,
            response_serializer=serialize,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    """crossfed.v1.Coordinator over a `RoundEngine`."""

    def __init__(
        self,
        engine: RoundEngine,
        upload_policy: UploadPolicy,
        *,
        chunk_size: int,
        model_config_json: str = "",
        authenticated: bool = False,
        credential_store: CredentialStore | None = None,
        server_fingerprint: str = "",
        max_concurrent_uploads: int = 4,
        upload_slot_wait_s: float = 30.0,
        max_upload_bytes_in_flight: int = 128 * 1024 * 1024,
        upload_idle_timeout_s: float = 60.0,
        bind_certificate: bool = False,
    ) -> None:
        self.engine = engine
        # each upload in flight holds its payload (its decoded tensors alias it): bounding
        # count and bytes keeps server memory O(model), not O(clients x model). A finished
        # upload's buffer is kept warm for the next one only while no upload waits for bytes:
        # under pressure it would sit beside the buffers of the uploads in flight.
        self._upload_admission: UploadAdmission
        self._upload_buffers: BufferPool = upload_buffer_pool(
            keep_idle=lambda: not self._upload_admission.under_pressure
        )
        self._upload_admission = UploadAdmission(
            max_concurrent_uploads,
            max_upload_bytes_in_flight,
            on_pressure=self._upload_buffers.clear,
        )
        self.upload_slot_wait_s = upload_slot_wait_s
        # one stream per client, none that stops sending
        self.upload_streams = UploadStreams(upload_idle_timeout_s, self._report_stalled)
        # sha256 of each served model version: hashing 100 MB per download request cost every
        # client ~55 ms of server CPU (a run's checkpoint of a version never changes)
        self._model_digests: dict[tuple[str, int], bytes] = {}
        self.upload_policy = upload_policy
        self.chunk_size = chunk_size
        self.model_config_json = model_config_json
        self.authenticated = authenticated
        self.credential_store = credential_store
        self.server_fingerprint = server_fingerprint
        self.bind_certificate = bind_certificate  # mTLS: enroll only as the certificate's name

    def _caller(self, context: grpc.ServicerContext) -> str:
        return caller_client_id(context, self.authenticated)

    # -- Enroll ------------------------------------------------------------------------
    def Enroll(
        self, request: coordinator_pb2.EnrollRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.EnrollResponse:
        if self.credential_store is None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this server runs without client authentication (insecure mode); no enrollment",
            )
        requested = request.requested_client_id or None
        if self.bind_certificate:
            requested = self._certificate_name(requested, context)
        try:
            cred = enroll(self.credential_store, request.enrollment_token, requested)
        except EnrollmentError as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        self.engine.record_event("client_enrolled", client_id=cred.client_id)
        return coordinator_pb2.EnrollResponse(
            client_id=cred.client_id,
            client_secret=cred.secret,
            server_fingerprint=self.server_fingerprint,
        )

    @staticmethod
    def _certificate_name(requested: str | None, context: grpc.ServicerContext) -> str:
        """Under mTLS a client enrolls as the client its certificate was issued to."""
        cert = peer_certificate(context)
        if cert is None or cert.role is not Role.CLIENT:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "mTLS: enrollment needs a client certificate"
                + (f" (this one is {cert.role.value} {cert.name!r})" if cert else ""),
            )
            raise AssertionError("unreachable: context.abort raises")
        if requested is not None and requested != cert.name:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"mTLS: the client certificate is issued to {cert.name!r}; it cannot enroll "
                f"as {requested!r}",
            )
        return cert.name

    # -- Register / Heartbeat ----------------------------------------------------------
    def Register(
        self, request: coordinator_pb2.RegisterRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.RegisterResponse:
        client_id = self._caller(context)
        if not client_id:
            if self.authenticated:
                abort_with(context, UnknownClientError("no authenticated client id"))
            client_id = new_client_id()
        try:
            reg = self.engine.register(
                client_id,
                int(request.modality),
                checked_count(request.num_samples, "num_samples"),
                checked_count(request.num_paired, "num_paired"),
                checked_count(request.num_text_only, "num_text_only"),
                checked_count(request.num_image_only, "num_image_only"),
                request.model_config_digest,
                request.daemon_version,
                facts=ClientFacts.from_request(request),
                sd_checkpoint_digest=request.sd_checkpoint_digest,
            )
        except ServerError as exc:
            abort_with(context, exc)
        contract = self.engine.contract
        return coordinator_pb2.RegisterResponse(
            client_id=reg.client_id,
            run_id=reg.run_id,
            current_round=reg.current_round,
            model_config_json=self.model_config_json,
            heartbeat_interval_ms=reg.heartbeat_interval_ms,
            chunk_size=self.chunk_size,
            class_names=contract.class_names if contract is not None else (),
            projection_privacy=self._projection_privacy(),
        )

    def _projection_privacy(self) -> coordinator_pb2.ProjectionPrivacy:
        """The mandate clients must apply to their projections (eq. 16)."""
        mandate = self.engine.projection_privacy.mandate
        if mandate is None:
            return coordinator_pb2.ProjectionPrivacy(required=False)
        return coordinator_pb2.ProjectionPrivacy(
            required=True,
            noise_multiplier=mandate.noise_multiplier,
            clip_norm=mandate.clip_norm,
            delta=mandate.delta,
            epsilon_budget=self.engine.epsilon_budget,
        )

    def Heartbeat(
        self, request: coordinator_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.HeartbeatResponse:
        act = self.engine.heartbeat(self._caller(context))
        key = self.upload_policy.upload_key
        return coordinator_pb2.HeartbeatResponse(
            action=act.action,  # type: ignore[arg-type]
            round=act.round,
            poll_after_ms=act.poll_after_ms,
            deadline_unix_s=act.deadline_unix_s,
            upload_public_key=key.public_key if key is not None else b"",
            local_epochs=act.local_epochs,
            run_state=act.run_state,
            message=act.message,
            proximal_mu=act.instructions.proximal_mu,
            logit_adjustment=act.instructions.logit_adjustment,
        )

    # -- Download ----------------------------------------------------------------------
    def DownloadGlobalModel(
        self, request: coordinator_pb2.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """The model's chunks as serialized ``TensorChunk`` frames (see
        `add_coordinator_to_server`: the bulk methods skip protobuf's data copies)."""
        client_id = self._caller(context)
        try:
            self.engine.require_known(client_id)
            version, path = self.engine.downloads.model_file(int(request.round))
            # opened now: a checkpoint pruned meanwhile stays readable through this handle
            handle = path.open("rb")
        except FileNotFoundError:
            abort_with(
                context,
                WrongRoundError(f"the input model of round {request.round} is no longer kept"),
            )
        except ServerError as exc:
            abort_with(context, exc)
        with handle:
            size = os.fstat(handle.fileno()).st_size
            cs = self.chunk_size
            total = max(1, -(-size // cs))
            if request.start_chunk >= total and size:
                context.abort(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"start_chunk {request.start_chunk} is past the last chunk ({total - 1})",
                )
            digest = self._model_digest(version, handle)
            frames = model_chunk_frames(
                handle.fileno(), size, cs, int(request.start_chunk), digest, int(request.round)
            )
            try:
                yield from frames
            except CheckpointChangedError as exc:
                context.abort(grpc.StatusCode.DATA_LOSS, str(exc))

    def _model_digest(self, version: int, handle: io.BufferedReader) -> bytes:
        key = (self.engine.run.run_id, version)
        digest = self._model_digests.get(key)
        if digest is None:
            digest = hashlib.file_digest(handle, "sha256").digest()
            if len(self._model_digests) >= 8:  # only the newest versions are downloaded
                self._model_digests.pop(next(iter(self._model_digests)))
            self._model_digests[key] = digest
        return digest

    # -- Upload ------------------------------------------------------------------------
    def UploadUpdate(
        self,
        request_iterator: Iterator[coordinator_pb2.UploadMessage | ChunkFrame],
        context: grpc.ServicerContext,
    ) -> coordinator_pb2.UploadResponse:
        """One header, then chunks (``ChunkFrame``s, zero-copy, under
        `add_coordinator_to_server`; protobuf messages also work)."""
        client_id = self._caller(context)
        first = next(request_iterator, None)
        if first is None or isinstance(first, ChunkFrame) or first.WhichOneof("kind") != "header":
            abort_with(context, InvalidUpdateError("an upload must start with an UploadHeader"))
        header = first.header
        round_no = min(int(header.round), MAX_WIRE_INT)  # out of range: refused below
        try:
            checked_count(header.round, "upload header round")
            check_header(header, self.upload_policy)
            ticket = self.engine.uploads.begin(
                client_id,
                round_no,
                header.upload_id,
                checked_count(header.num_samples, "upload header num_samples"),
                {
                    k: checked_count(v, f"module_samples[{k!r}]")
                    for k, v in header.module_samples.items()
                },
            )
            if isinstance(ticket, UploadOutcome):
                return coordinator_pb2.UploadResponse(
                    accepted=ticket.accepted, duplicate=ticket.duplicate, message=ticket.message
                )
            with (
                self.upload_streams.track(client_id, round_no, context.cancel) as watch,
                self._upload_admission.slot(self.upload_slot_wait_s) as slot,
            ):
                if slot is None:
                    raise ServerBusyError("server busy: too many uploads in flight; retry shortly")
                watch.touch()
                wait_s = self.upload_slot_wait_s

                def before_chunk(size: int) -> None:
                    watch.touch()
                    if not slot.take(size, wait_s):
                        raise ServerBusyError(
                            "server busy: the bytes in flight are at their limit; retry shortly"
                        )

                try:
                    received = receive_payload(
                        header,
                        request_iterator,
                        self.upload_policy,
                        client_id,
                        before_chunk,
                        SlotBuffers(self._upload_buffers, slot),
                    )
                except (ServerError, grpc.RpcError) as exc:
                    if watch.cancelled:  # the stream was cut by the server: say why
                        raise UploadCancelledError(
                            f"upload stream cancelled: {watch.cancelled}"
                        ) from exc
                    raise
                try:
                    # zero-copy: the tensors are views of the verified payload buffer
                    tensors = decode_tensors(received.view, copy=False)
                except WireError as exc:
                    raise InvalidUpdateError(
                        f"update payload is not valid safetensors: {exc}"
                    ) from exc
                digest = received.digest
                del received
                outcome = self.engine.uploads.complete(
                    ticket,
                    tensors,
                    payload_sha256=digest,
                    metrics=dict(header.metrics.values),
                )
                del tensors
        except ServerError as exc:
            log.info("upload from %s for round %d rejected: %s", client_id, round_no, exc)
            if not isinstance(exc, ENGINE_LOGGED):  # the engine recorded those itself
                self.engine.uploads.record_rejection(client_id, round_no, str(exc))
            abort_with(context, exc)
        return coordinator_pb2.UploadResponse(
            accepted=outcome.accepted, duplicate=outcome.duplicate, message=outcome.message
        )

    def _report_stalled(self, watch: StreamWatch) -> None:
        """An upload stream was cancelled for sending nothing: say so (event + log)."""
        message = f"upload stream cancelled: {watch.cancelled}; its slot and bytes are freed"
        log.warning("upload from %s for round %d: %s", watch.client_id, watch.round_no, message)
        self.engine.record_event("upload_stalled", watch.round_no, watch.client_id, message)

    # -- Projections (eq. 16) ----------------------------------------------------------
    def ExchangeProjections(
        self, request: coordinator_pb2.ProjectionExchangeRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ProjectionExchangeResponse:
        client_id = self._caller(context)
        payload = bytes(request.projections.safetensors)
        try:
            digest = request.projections.payload_sha256
            if payload and digest and hashlib.sha256(payload).digest() != digest:
                raise InvalidUpdateError("projection payload does not match its sha256")
            reply = self.engine.projection_exchange.exchange(
                client_id,
                int(request.round),
                payload,
                float(request.epsilon_spent),
                declared_mechanism(request),
            )
        except ServerError as exc:
            abort_with(context, exc)
        response = coordinator_pb2.ProjectionExchangeResponse(
            prototypes_round=reply.prototypes_round,
            epsilon_spent=reply.epsilon_spent,
            epsilon_budget=reply.epsilon_budget,
        )
        if reply.prototypes:
            response.global_prototypes.safetensors = reply.prototypes
            response.global_prototypes.payload_sha256 = hashlib.sha256(reply.prototypes).digest()
        return response


def declared_mechanism(
    request: coordinator_pb2.ProjectionExchangeRequest,
) -> ProjectionDPParams | None:
    """The noise a client says it applied (None: none, or nothing usable)."""
    try:
        params = ProjectionDPParams(float(request.clip_norm), float(request.noise_multiplier))
    except ProjectionDPError:
        return None
    return params if params.noise_multiplier > 0 else None
