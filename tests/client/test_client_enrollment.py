"""Enrollment over loopback gRPC: token -> credential stored 0600, later calls HMAC-signed and
accepted by the server's auth interceptor; unsigned calls are refused with a clear error."""

from __future__ import annotations

import random
import stat
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from crossfed.client.backoff import Backoff, RetryPolicy
from crossfed.client.enrollment import (
    credential_path,
    enroll_with_token,
    load_credential,
    stored_client_id,
)
from crossfed.client.errors import ClientConfigError, FatalServerError
from crossfed.client.transport import CallDeadlines, ChannelSecurity, GrpcTransport
from crossfed.common.crypto.identity import (
    InMemoryCredentialStore,
    RequestVerifier,
    create_enrollment_token,
    enroll,
)
from crossfed.common.crypto.rpc_auth import ServerAuthInterceptor, authenticated_identity
from crossfed.v1 import coordinator_pb2, coordinator_pb2_grpc

from tests.support.ports import free_port


class Servicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, store: InMemoryCredentialStore) -> None:
        self.store = store
        self.callers: list[str] = []

    def Enroll(self, request, context):
        credential = enroll(self.store, request.enrollment_token, request.requested_client_id)
        return coordinator_pb2.EnrollResponse(
            client_id=credential.client_id, client_secret=credential.secret
        )

    def Heartbeat(self, request, context):
        self.callers.append(authenticated_identity(context).client_id)
        return coordinator_pb2.HeartbeatResponse(action=coordinator_pb2.ACTION_WAIT)


@pytest.fixture()
def auth_server() -> Iterator[tuple[str, InMemoryCredentialStore, Servicer]]:
    store = InMemoryCredentialStore()
    servicer = Servicer(store)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[ServerAuthInterceptor(RequestVerifier(store))],
    )
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield f"127.0.0.1:{port}", store, servicer
    server.stop(grace=None)


def _connect(target: str, **kwargs: object) -> GrpcTransport:
    return GrpcTransport.connect(
        target, ChannelSecurity(insecure=True), CallDeadlines(2.0, 2.0, 5.0), **kwargs
    )  # type: ignore[arg-type]


def test_enroll_stores_secret_0600_and_signed_calls_are_accepted(
    auth_server: tuple[str, InMemoryCredentialStore, Servicer], tmp_path: Path
) -> None:
    target, store, servicer = auth_server
    token = create_enrollment_token(store).token.reveal()
    plain = _connect(target)
    backoff = Backoff(RetryPolicy(initial_delay_s=0.01), random.Random(0))
    credential = enroll_with_token(plain, tmp_path, token, "edge-7", backoff)
    plain.close()
    assert credential.client_id == "edge-7"
    mode = stat.S_IMODE(credential_path(tmp_path).stat().st_mode)
    assert mode == 0o600
    reloaded = load_credential(tmp_path)
    assert reloaded is not None and reloaded.secret == credential.secret

    signed = _connect(target, credential=reloaded)
    try:
        response = signed.heartbeat(coordinator_pb2.HeartbeatRequest())
    finally:
        signed.close()
    assert response.action == coordinator_pb2.ACTION_WAIT
    assert servicer.callers == ["edge-7"]


def test_unsigned_call_is_refused_as_fatal(
    auth_server: tuple[str, InMemoryCredentialStore, Servicer],
) -> None:
    target, _, servicer = auth_server
    transport = _connect(target, client_id="edge-7")
    try:
        with pytest.raises(FatalServerError, match="UNAUTHENTICATED"):
            transport.heartbeat(coordinator_pb2.HeartbeatRequest())
    finally:
        transport.close()
    assert servicer.callers == []


def test_group_readable_credential_is_a_config_error(tmp_path: Path) -> None:
    path = credential_path(tmp_path)
    path.write_text('{"client_id": "a", "secret": "AAAAAAAAAAAAAAAAAAAAAAAAAAAA"}')
    path.chmod(0o644)
    with pytest.raises(ClientConfigError, match="credential|permission|readable"):
        load_credential(tmp_path)


def test_no_credential_file_means_none(tmp_path: Path) -> None:
    assert load_credential(tmp_path) is None


def test_stored_client_id_is_stable_and_guards_against_reuse(tmp_path: Path) -> None:
    first = stored_client_id(tmp_path)
    assert first.startswith("client-")
    assert stored_client_id(tmp_path) == first
    with pytest.raises(ClientConfigError, match="belongs to client"):
        stored_client_id(tmp_path, "someone-else")
    assert stored_client_id(tmp_path / "b", "edge-3") == "edge-3"
    with pytest.raises(ClientConfigError):
        stored_client_id(tmp_path / "c", "bad id with spaces")
