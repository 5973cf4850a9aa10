"""Per-RPC authentication over real loopback gRPC: interceptors, status codes, identity."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from crossfed.common.crypto.grpc_credentials import server_credentials
from crossfed.common.crypto.identity import (
    ClientCredential,
    InMemoryCredentialStore,
    RequestVerifier,
    create_admin_credential,
    create_enrollment_token,
    enroll,
    sign_request,
)
from crossfed.common.crypto.rpc_auth import (
    MethodPatternError,
    NotAuthenticatedError,
    ServerAuthInterceptor,
    authenticated_channel,
    authenticated_identity,
)

from tests.support.certificates import make_certs

COORD = "crossfed.v1.Coordinator"
ADMIN = "crossfed.v1.Admin"


def _whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    identity = authenticated_identity(context)
    return f"{identity.client_id}:{identity.role.value}".encode()


def _whoami_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for _ in range(2):  # runs lazily, after the behaviour returned
        yield authenticated_identity(context).client_id.encode()


def _count_upload(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    total = sum(len(r) for r in requests)
    return f"{authenticated_identity(context).client_id}:{total}".encode()


def _enroll(request: bytes, context: grpc.ServicerContext) -> bytes:
    try:
        authenticated_identity(context)
    except NotAuthenticatedError:
        return b"public"
    return b"unexpected"


@dataclass
class Env:
    port: int
    store: InMemoryCredentialStore
    client: ClientCredential
    admin: ClientCredential
    certs: Path
    tls_port: int


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    certs = tmp_path_factory.mktemp("rpcauth-certs")
    make_certs(certs)
    store = InMemoryCredentialStore()
    client = enroll(store, create_enrollment_token(store).token.reveal(), "c1")
    admin = create_admin_credential(store, "ops")
    interceptor = ServerAuthInterceptor(
        RequestVerifier(store, max_skew_s=30),
        public_methods=[f"/{COORD}/Enroll"],
        admin_methods=[f"/{ADMIN}/"],
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[interceptor])
    coord = grpc.method_handlers_generic_handler(
        COORD,
        {
            "Enroll": grpc.unary_unary_rpc_method_handler(_enroll),
            "Heartbeat": grpc.unary_unary_rpc_method_handler(_whoami),
            "Download": grpc.unary_stream_rpc_method_handler(_whoami_stream),
            "Upload": grpc.stream_unary_rpc_method_handler(_count_upload),
        },
    )
    admin_svc = grpc.method_handlers_generic_handler(
        ADMIN, {"StopRun": grpc.unary_unary_rpc_method_handler(_whoami)}
    )
    server.add_generic_rpc_handlers((coord, admin_svc))
    port = server.add_insecure_port("127.0.0.1:0")
    tls_port = server.add_secure_port("127.0.0.1:0", server_credentials(certs))
    server.start()
    yield Env(port, store, client, admin, certs, tls_port)
    server.stop(None)


def _code(call: object, *args: object, **kw: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, timeout=5, **kw)  # type: ignore[operator]
    return err.value.code()  # type: ignore[no-any-return]


def test_signed_calls_reach_handler_with_identity_all_kinds(env: Env) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{env.port}") as raw:
        ch = authenticated_channel(raw, env.client)
        assert ch.unary_unary(f"/{COORD}/Heartbeat")(b"", timeout=5) == b"c1:client"
        assert list(ch.unary_stream(f"/{COORD}/Download")(b"", timeout=5)) == [b"c1", b"c1"]
        upload = ch.stream_unary(f"/{COORD}/Upload")
        assert upload(iter([b"ab", b"cde"]), timeout=5) == b"c1:5"
        assert ch.unary_unary(f"/{COORD}/Enroll")(b"", timeout=5) == b"public"


def test_missing_forged_replayed_expired_credentials_are_unauthenticated(env: Env) -> None:
    method = f"/{COORD}/Heartbeat"
    with grpc.insecure_channel(f"127.0.0.1:{env.port}") as raw:
        call = raw.unary_unary(method)
        assert _code(call, b"") == grpc.StatusCode.UNAUTHENTICATED
        forged = ClientCredential("c1", b"guessed-secret-guessed-secret!!!")
        assert _code(call, b"", metadata=sign_request(forged, method)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        md = sign_request(env.client, method)
        assert call(b"", metadata=md, timeout=5) == b"c1:client"
        assert _code(call, b"", metadata=md) == grpc.StatusCode.UNAUTHENTICATED  # replay
        stale = sign_request(env.client, method, now=time.time() - 3600)
        assert _code(call, b"", metadata=stale) == grpc.StatusCode.UNAUTHENTICATED
        # streaming methods are refused before the handler reads anything
        upload = raw.stream_unary(f"/{COORD}/Upload")
        assert _code(upload, iter([b"x"])) == grpc.StatusCode.UNAUTHENTICATED
        download = raw.unary_stream(f"/{COORD}/Download")
        with pytest.raises(grpc.RpcError) as err:
            list(download(b"", timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing credentials" in (err.value.details() or "")


def test_admin_methods_need_admin_credential(env: Env) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{env.port}") as raw:
        as_client = authenticated_channel(raw, env.client).unary_unary(f"/{ADMIN}/StopRun")
        with pytest.raises(grpc.RpcError) as err:
            as_client(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "requires an admin credential" in (err.value.details() or "")
        as_admin = authenticated_channel(raw, env.admin).unary_unary(f"/{ADMIN}/StopRun")
        assert as_admin(b"", timeout=5) == b"ops:admin"
        assert _code(raw.unary_unary(f"/{ADMIN}/StopRun"), b"") == (grpc.StatusCode.UNAUTHENTICATED)


def test_revoked_client_is_refused(env: Env) -> None:
    extra = enroll(env.store, create_enrollment_token(env.store).token.reveal(), "to-revoke")
    with grpc.insecure_channel(f"127.0.0.1:{env.port}") as raw:
        call = authenticated_channel(raw, extra).unary_unary(f"/{COORD}/Heartbeat")
        assert call(b"", timeout=5) == b"to-revoke:client"
        env.store.revoke("to-revoke")
        assert _code(call, b"") == grpc.StatusCode.UNAUTHENTICATED


def test_bad_method_patterns_are_rejected() -> None:
    with pytest.raises(MethodPatternError, match="must look like"):
        ServerAuthInterceptor(RequestVerifier(InMemoryCredentialStore()), public_methods=["Enroll"])
