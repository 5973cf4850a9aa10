"""GrpcTransport over real gRPC on 127.0.0.1: status codes become the right client errors,
the client id travels in metadata, and ClientLoop survives a server restart mid-upload."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from crossfed.client.backoff import Backoff, RetryPolicy
from crossfed.client.errors import (
    AlreadyUploadedError,
    ClientConfigError,
    FatalServerError,
    NotRegisteredError,
    RoundAbandonedError,
    TransientTransportError,
)
from crossfed.client.loop import (
    ClientLoop,
    LoopSettings,
    ProjectionUpload,
    Registered,
    Registration,
)
from crossfed.client.transport import (
    CallDeadlines,
    ChannelSecurity,
    GrpcTransport,
    classify_rpc_error,
)
from crossfed.client.update_upload import LocalUpdate
from crossfed.common.crypto.identity import HEADER_CLIENT_ID
from crossfed.common.round_instructions import PLAIN, RoundInstructions
from crossfed.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

from tests.support.certificates import make_certs
from tests.support.ports import free_port

MODEL = bytes(range(256)) * 40  # 10 KiB, 10 chunks of 1 KiB


@dataclass
class Shared:
    """Server-side state that survives a restart (as the real server's SQLite would)."""

    counted: dict[int, str] = field(default_factory=dict)
    seen_ids: list[str] = field(default_factory=list)
    heartbeat_codes: list[grpc.StatusCode] = field(default_factory=list)
    uploads_started: int = 0
    kill_during_upload: threading.Event = field(default_factory=threading.Event)
    slow_download: bool = False
    rounds: int = 2


class Servicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def _who(self, context: grpc.ServicerContext) -> str:
        meta = dict(context.invocation_metadata())
        who = str(meta.get(HEADER_CLIENT_ID, ""))
        self.shared.seen_ids.append(who)
        return who

    def Register(self, request, context):
        self._who(context)
        return coordinator_pb2.RegisterResponse(client_id="edge-1", run_id="r", chunk_size=1024)

    def Heartbeat(self, request, context):
        self._who(context)
        if self.shared.heartbeat_codes:
            context.abort(self.shared.heartbeat_codes.pop(0), "scripted failure")
        pending = [r for r in range(1, self.shared.rounds + 1) if r not in self.shared.counted]
        if not pending:
            return coordinator_pb2.HeartbeatResponse(action=coordinator_pb2.ACTION_DONE)
        return coordinator_pb2.HeartbeatResponse(
            action=coordinator_pb2.ACTION_TRAIN, round=pending[0]
        )

    def DownloadGlobalModel(self, request, context):
        self._who(context)
        digest = hashlib.sha256(MODEL).digest()
        total = len(MODEL) // 1024
        for index in range(request.start_chunk, total):
            if self.shared.slow_download:
                time.sleep(0.05)
            yield common_pb2.TensorChunk(
                index=index,
                total=total,
                data=MODEL[index * 1024 : (index + 1) * 1024],
                payload_sha256=digest,
                payload_size=len(MODEL),
                round=request.round,
            )

    def UploadUpdate(self, request_iterator, context):
        self._who(context)
        header = None
        parts = []
        self.shared.uploads_started += 1
        for message in request_iterator:
            if message.HasField("header"):
                header = message.header
            else:
                parts.append(message.chunk.data)
                if self.shared.uploads_started == 1 and len(parts) == 2:
                    self.shared.kill_during_upload.set()
                    time.sleep(5)  # the test stops the server meanwhile
        assert header is not None
        if header.round in self.shared.counted:
            same = self.shared.counted[header.round] == header.upload_id
            if not same:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, "another upload_id")
            return coordinator_pb2.UploadResponse(accepted=True, duplicate=True)
        if hashlib.sha256(b"".join(parts)).digest() != header.payload_sha256:
            context.abort(grpc.StatusCode.DATA_LOSS, "digest mismatch")
        self.shared.counted[header.round] = header.upload_id
        return coordinator_pb2.UploadResponse(accepted=True)

    def ExchangeProjections(self, request, context):
        self._who(context)
        return coordinator_pb2.ProjectionExchangeResponse()


def _serve(shared: Shared, port: int) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(Servicer(shared), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    assert bound == port
    server.start()
    return server


@pytest.fixture()
def served() -> Iterator[tuple[Shared, int, grpc.Server]]:
    shared = Shared()
    port = free_port()
    server = _serve(shared, port)
    yield shared, port, server
    server.stop(grace=None)


def _transport(port: int, **kwargs: object) -> GrpcTransport:
    return GrpcTransport.connect(
        f"127.0.0.1:{port}", ChannelSecurity(insecure=True), CallDeadlines(2.0, 2.0, 10.0), **kwargs
    )  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.UNAVAILABLE, TransientTransportError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, TransientTransportError),
        (grpc.StatusCode.FAILED_PRECONDITION, RoundAbandonedError),
        (grpc.StatusCode.NOT_FOUND, NotRegisteredError),
        (grpc.StatusCode.ALREADY_EXISTS, AlreadyUploadedError),
        (grpc.StatusCode.UNAUTHENTICATED, FatalServerError),
        (grpc.StatusCode.INVALID_ARGUMENT, FatalServerError),
    ],
)
def test_status_codes_map_to_client_errors(
    served: tuple[Shared, int, grpc.Server], code: grpc.StatusCode, error: type[Exception]
) -> None:
    shared, port, _ = served
    shared.heartbeat_codes.append(code)
    transport = _transport(port)
    try:
        with pytest.raises(error, match=code.name):
            transport.heartbeat(coordinator_pb2.HeartbeatRequest())
    finally:
        transport.close()


def test_client_id_metadata_sent_once_known(served: tuple[Shared, int, grpc.Server]) -> None:
    shared, port, _ = served
    transport = _transport(port)
    try:
        transport.register(coordinator_pb2.RegisterRequest())
        transport.set_client_id("edge-1")
        transport.heartbeat(coordinator_pb2.HeartbeatRequest())
    finally:
        transport.close()
    assert shared.seen_ids == ["", "edge-1"]


def test_nothing_listening_is_transient() -> None:
    transport = _transport(free_port())
    try:
        with pytest.raises(TransientTransportError, match="UNAVAILABLE"):
            transport.heartbeat(coordinator_pb2.HeartbeatRequest())
    finally:
        transport.close()


def test_bad_address_is_a_config_error() -> None:
    with pytest.raises(ClientConfigError, match="host:port"):
        GrpcTransport.connect("localhost", ChannelSecurity(insecure=True))


@dataclass
class Worker:
    loaded: list[bytes] = field(default_factory=list)

    def registration(self) -> Registration:
        return Registration(common_pb2.MODALITY_CONFIG_TEXT_ONLY, 5, 0, 5, 0)

    def on_registered(self, registered: Registered) -> None:
        pass

    def load_global(self, round_id: int, payload: bytes) -> None:
        self.loaded.append(payload)

    def train(
        self,
        round_id: int,
        local_epochs: int | None,
        instructions: RoundInstructions = PLAIN,
    ) -> LocalUpdate:
        return LocalUpdate(payload=bytes([round_id]) * 5000, num_samples=5)

    def projections(self, round_id: int) -> ProjectionUpload | None:
        return None

    def receive_prototypes(self, round_id: int, payload: bytes) -> None:
        pass


def test_loop_survives_server_restart_mid_upload_and_counts_once(
    served: tuple[Shared, int, grpc.Server],
) -> None:
    shared, port, server = served
    holder = {"server": server}

    def restart_when_upload_is_cut() -> None:
        assert shared.kill_during_upload.wait(20)
        holder["server"].stop(grace=None)
        time.sleep(0.5)  # clients see UNAVAILABLE meanwhile
        holder["server"] = _serve(shared, port)

    restarter = threading.Thread(target=restart_when_upload_is_cut, daemon=True)
    restarter.start()
    policy = RetryPolicy(initial_delay_s=0.05, max_delay_s=0.5, give_up_after_s=20)
    worker = Worker()
    transport = _transport(port)
    loop = ClientLoop(
        transport,
        worker,
        LoopSettings(retry=policy, default_poll_s=0.05),
        backoff=Backoff(policy, random.Random(3)),
    )
    try:
        stats = loop.run()
    finally:
        transport.close()
        restarter.join(5)
        holder["server"].stop(grace=None)
    assert stats.rounds_completed == [1, 2]
    assert stats.transient_failures >= 1
    round1_ids = {uid for r, uid in stats.upload_attempts if r == 1}
    assert len(round1_ids) == 1 and shared.counted[1] in round1_ids
    assert len([r for r, _ in stats.upload_attempts if r == 1]) >= 2
    assert worker.loaded == [MODEL, MODEL]


def test_tls_channel_from_certs_dir_and_missing_ca_is_a_config_error(tmp_path: Path) -> None:
    from crossfed.common.crypto.grpc_credentials import server_credentials

    make_certs(tmp_path)
    shared = Shared()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(Servicer(shared), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(tmp_path))
    server.start()
    transport = GrpcTransport.connect(
        f"127.0.0.1:{port}", ChannelSecurity(cert_dir=tmp_path), CallDeadlines(5.0, 5.0, 5.0)
    )
    try:
        response = transport.register(coordinator_pb2.RegisterRequest())
    finally:
        transport.close()
        server.stop(grace=None)
    assert response.client_id == "edge-1"
    with pytest.raises(ClientConfigError, match="TLS"):
        GrpcTransport.connect("127.0.0.1:1", ChannelSecurity(cert_dir=tmp_path / "nothing"))


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("details", "error"),
    [
        ("Internal error from Core", TransientTransportError),
        ("Received RST_STREAM with error code 2", TransientTransportError),
        ("Exception deserializing request!", FatalServerError),
    ],
)
def test_internal_errors_that_are_really_the_connection_are_retried(
    details: str, error: type[Exception]
) -> None:
    with pytest.raises(error, match="UploadUpdate: INTERNAL"):
        classify_rpc_error(_FakeRpcError(grpc.StatusCode.INTERNAL, details), "UploadUpdate")
