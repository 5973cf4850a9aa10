"""gRPC transport of the client daemon: channel creation, per-call deadlines and metadata, and
the mapping of gRPC status codes onto the three things the loop can do about a failure
(retry / abandon the round / stop). No loop logic lives here (OpenFL style)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, Protocol

import grpc
from crossfed.client.call_identity import identity_metadata
from crossfed.client.errors import (
    AlreadyUploadedError,
    ClientConfigError,
    FatalServerError,
    NotRegisteredError,
    RoundAbandonedError,
    TransientTransportError,
)
from crossfed.common.crypto.certificates import CertificateError
from crossfed.common.crypto.grpc_credentials import channel_credentials, warn_insecure
from crossfed.common.crypto.identity import ClientCredential
from crossfed.common.crypto.rpc_auth import authenticated_channel
from crossfed.common.wire.chunk_stream import ChunkFrame, chunk_frame_from_wire, wire_bytes
from crossfed.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)

# Network trouble and overload: the same call may succeed later.
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DATA_LOSS,  # the server received a damaged stream: send it again
    }
)
# The server moved on (round closed, not selected, run paused): the round's work is void.
ROUND_ABANDON_CODES = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE})
# Substrings of INTERNAL/UNKNOWN details that are really a dropped or refused connection.
# "internal error from core": gRPC's client core reports a stream the server refused under
# load (RESOURCE_EXHAUSTED beyond maximum_concurrent_rpcs) this way; retrying is right.
_RESET_MARKERS = (
    "rst_stream",
    "connection reset",
    "socket closed",
    "broken pipe",
    "goaway",
    "internal error from core",
)
# Method path prefix of the Coordinator service (the two bulk calls are built by hand).
_SERVICE = "/crossfed.v1.Coordinator/"


class CoordinatorTransport(Protocol):
    """What the client loop needs from the server; a fake implements it in unit tests.

    Every method raises a :mod:`crossfed.client.errors` class (transient, round abandoned,
    not registered, already uploaded, fatal) instead of transport-specific exceptions.
    """

    def set_client_id(self, client_id: str) -> None:
        """Identify later calls as ``client_id`` (assigned or confirmed by Register)."""

    def enroll(self, request: coordinator_pb2.EnrollRequest) -> coordinator_pb2.EnrollResponse:
        """Exchange an enrollment token for per-client credentials."""

    def register(
        self, request: coordinator_pb2.RegisterRequest
    ) -> coordinator_pb2.RegisterResponse:
        """Announce modalities and data size (idempotent)."""

    def heartbeat(
        self, request: coordinator_pb2.HeartbeatRequest
    ) -> coordinator_pb2.HeartbeatResponse:
        """Ask what to do now."""

    def download(
        self, request: coordinator_pb2.DownloadRequest
    ) -> Iterator[common_pb2.TensorChunk | ChunkFrame]:
        """Stream the global model's chunks from ``request.start_chunk`` on."""

    def upload(
        self, messages: Iterable[coordinator_pb2.UploadMessage]
    ) -> coordinator_pb2.UploadResponse:
        """Send one header then the chunks of a local update."""

    def exchange_projections(
        self, request: coordinator_pb2.ProjectionExchangeRequest
    ) -> coordinator_pb2.ProjectionExchangeResponse:
        """Eq. 16: send local projections, receive the global prototypes."""

    def close(self) -> None:
        """Release the connection."""


@dataclass(frozen=True)
class ChannelSecurity:
    """TLS material for the channel; ``insecure`` must be asked for explicitly."""

    insecure: bool = False
    cert_dir: Path | None = None  # `crossfed certs` layout (trust its CA); None: system roots
    client_cert_name: str | None = None  # mTLS: also present cert_dir's client/<name> pair
    server_name_override: str | None = None  # when the address is not in the cert's SANs


@dataclass(frozen=True)
class CallDeadlines:
    """Per-call deadlines in seconds: short for control calls, long for model transfer."""

    unary_s: float = 30.0
    heartbeat_s: float = 10.0
    transfer_s: float = 600.0


@dataclass(frozen=True)
class ChannelOptions:
    """gRPC channel knobs that matter for reconnecting quickly after a server restart."""

    max_message_bytes: int = 64 * 1024 * 1024
    # gRPC's own reconnect backoff defaults to up to 120 s; ours (RetryPolicy) is in charge.
    min_reconnect_backoff_ms: int = 100
    max_reconnect_backoff_ms: int = 2000
    keepalive_time_ms: int = 30_000
    extra: tuple[tuple[str, int | str], ...] = field(default_factory=tuple)

    def as_grpc_options(self) -> list[tuple[str, int | str]]:
        """Options in the (name, value) form grpc.*_channel() takes."""
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", self.min_reconnect_backoff_ms),
            ("grpc.min_reconnect_backoff_ms", self.min_reconnect_backoff_ms),
            ("grpc.max_reconnect_backoff_ms", self.max_reconnect_backoff_ms),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.enable_retries", 0),  # retries are the loop's job, with one policy
            *self.extra,
        ]


def _channel_credentials(security: ChannelSecurity) -> grpc.ChannelCredentials:
    if security.cert_dir is None:
        if security.client_cert_name:
            raise ClientConfigError("mTLS needs the certificates directory (tls.cert_dir)")
        return grpc.ssl_channel_credentials()
    try:
        return channel_credentials(security.cert_dir, security.client_cert_name)
    except CertificateError as exc:
        raise ClientConfigError(f"TLS: {exc}") from exc


def create_channel(
    target: str, security: ChannelSecurity, options: ChannelOptions | None = None
) -> grpc.Channel:
    """Open a (TLS unless asked otherwise) channel to the coordinator at ``target``."""
    if not target or ":" not in target:
        raise ClientConfigError(f"server address must be host:port, got {target!r}")
    opts = (options or ChannelOptions()).as_grpc_options()
    if security.insecure:
        warn_insecure(log)
        return grpc.insecure_channel(target, options=opts)
    credentials = _channel_credentials(security)
    if security.server_name_override:
        opts.append(("grpc.ssl_target_name_override", security.server_name_override))
    return grpc.secure_channel(target, credentials, options=opts)


def _details(error: grpc.RpcError) -> str:
    details = error.details() if hasattr(error, "details") else None
    return str(details or error)


def classify_rpc_error(error: grpc.RpcError, call: str) -> NoReturn:
    """Re-raise a gRPC error as the client error class that says what to do about it."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = _details(error)
    message = f"{call}: {code.name}: {details}"
    if code in TRANSIENT_CODES:
        raise TransientTransportError(message) from error
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and any(
        marker in details.lower() for marker in _RESET_MARKERS
    ):
        raise TransientTransportError(message) from error
    if code in ROUND_ABANDON_CODES:
        raise RoundAbandonedError(message) from error
    if code == grpc.StatusCode.NOT_FOUND:
        raise NotRegisteredError(message) from error
    if code == grpc.StatusCode.ALREADY_EXISTS:
        raise AlreadyUploadedError(message) from error
    raise FatalServerError(message) from error


class GrpcTransport:
    """:class:`CoordinatorTransport` over a real gRPC channel."""

    def __init__(
        self,
        channel: grpc.Channel,
        deadlines: CallDeadlines | None = None,
        client_id: str | None = None,
        credential: ClientCredential | None = None,
    ) -> None:
        self._channel = channel
        # With a credential every call is HMAC-signed by the crypto interceptor (which also
        # sends the client id); without one, the bare client-id header is all we have.
        calls = authenticated_channel(channel, credential) if credential else channel
        self._stub = coordinator_pb2_grpc.CoordinatorStub(calls)
        # the two bulk calls with zero-copy framing (crossfed.common.wire.chunk_stream): chunk
        # data arrives as a view of gRPC's message, uploads go out pre-serialized
        self._download_call = calls.unary_stream(
            _SERVICE + "DownloadGlobalModel",
            request_serializer=coordinator_pb2.DownloadRequest.SerializeToString,
            response_deserializer=chunk_frame_from_wire,
            _registered_method=True,
        )
        self._upload_call = calls.stream_unary(
            _SERVICE + "UploadUpdate",
            request_serializer=wire_bytes,
            response_deserializer=coordinator_pb2.UploadResponse.FromString,
            _registered_method=True,
        )
        self._deadlines = deadlines or CallDeadlines()
        self._credential = credential
        self._client_id = credential.client_id if credential else client_id

    @classmethod
    def connect(
        cls,
        target: str,
        security: ChannelSecurity,
        deadlines: CallDeadlines | None = None,
        client_id: str | None = None,
        options: ChannelOptions | None = None,
        credential: ClientCredential | None = None,
    ) -> GrpcTransport:
        """Create the channel and the transport over it (connection happens lazily)."""
        channel = create_channel(target, security, options)
        return cls(channel, deadlines, client_id, credential)

    def set_client_id(self, client_id: str) -> None:
        if self._credential is not None and client_id != self._credential.client_id:
            raise FatalServerError(
                f"server calls this client {client_id!r} but its credential is for "
                f"{self._credential.client_id!r}"
            )
        self._client_id = client_id

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self._credential is not None:
            return ()  # the signing interceptor adds identity + signature
        return identity_metadata(self._client_id)

    def enroll(self, request: coordinator_pb2.EnrollRequest) -> coordinator_pb2.EnrollResponse:
        try:
            return self._stub.Enroll(request, timeout=self._deadlines.unary_s)  # type: ignore[no-any-return]
        except grpc.RpcError as exc:
            classify_rpc_error(exc, "Enroll")

    def register(
        self, request: coordinator_pb2.RegisterRequest
    ) -> coordinator_pb2.RegisterResponse:
        try:
            return self._stub.Register(  # type: ignore[no-any-return]
                request,
                timeout=self._deadlines.unary_s,
                metadata=self._metadata(),
            )
        except grpc.RpcError as exc:
            classify_rpc_error(exc, "Register")

    def heartbeat(
        self, request: coordinator_pb2.HeartbeatRequest
    ) -> coordinator_pb2.HeartbeatResponse:
        try:
            return self._stub.Heartbeat(  # type: ignore[no-any-return]
                request,
                timeout=self._deadlines.heartbeat_s,
                metadata=self._metadata(),
            )
        except grpc.RpcError as exc:
            classify_rpc_error(exc, "Heartbeat")

    def download(self, request: coordinator_pb2.DownloadRequest) -> Iterator[ChunkFrame]:
        try:
            stream = self._download_call(
                request,
                timeout=self._deadlines.transfer_s,
                metadata=self._metadata(),
            )
            try:
                yield from stream
            finally:
                stream.cancel()  # no-op when finished; frees the call if the reader stopped
        except grpc.RpcError as exc:
            classify_rpc_error(exc, "DownloadGlobalModel")

    def upload(
        self, messages: Iterable[coordinator_pb2.UploadMessage]
    ) -> coordinator_pb2.UploadResponse:
        frames = getattr(messages, "wire_frames", None)
        requests: Iterator[object] = frames() if callable(frames) else iter(messages)
        try:
            return self._upload_call(  # type: ignore[no-any-return]
                requests,
                timeout=self._deadlines.transfer_s,
                metadata=self._metadata(),
            )
        except grpc.RpcError as exc:
            classify_rpc_error(exc, "UploadUpdate")

    def exchange_projections(
        self, request: coordinator_pb2.ProjectionExchangeRequest
    ) -> coordinator_pb2.ProjectionExchangeResponse:
        try:
            return self._stub.ExchangeProjections(  # type: ignore[no-any-return]
                request,
                timeout=self._deadlines.unary_s,
                metadata=self._metadata(),
            )
        except grpc.RpcError as exc:
            classify_rpc_error(exc, "ExchangeProjections")

    def close(self) -> None:
        self._channel.close()
