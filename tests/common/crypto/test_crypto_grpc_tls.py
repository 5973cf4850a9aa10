"""Real TLS/mTLS handshakes on loopback with a generic bytes-in/bytes-out gRPC service."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from crossfed.common.crypto.grpc_credentials import channel_credentials, server_credentials

from tests.support.certificates import make_certs

METHOD = "/crossfed.test.Echo/Echo"


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"echo:" + request


def _start(creds: grpc.ServerCredentials) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "crossfed.test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return server, port


def _call(port: int, creds: grpc.ChannelCredentials, host: str = "127.0.0.1") -> bytes:
    with grpc.secure_channel(f"{host}:{port}", creds) as channel:
        stub = channel.unary_unary(METHOD)
        return stub(b"hi", timeout=5)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("certs")
    make_certs(root, ["c1"])
    return root


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated project CA with its own client certificate."""
    root = tmp_path_factory.mktemp("other")
    make_certs(root, ["c1"], server=False)
    return root


@pytest.fixture(scope="module")
def tls_server(certs: Path) -> Iterator[int]:
    server, port = _start(server_credentials(certs))
    yield port
    server.stop(None)


@pytest.fixture(scope="module")
def mtls_server(certs: Path) -> Iterator[int]:
    server, port = _start(server_credentials(certs, require_client_auth=True))
    yield port
    server.stop(None)


def test_tls_client_with_project_ca_connects(certs: Path, tls_server: int) -> None:
    assert _call(tls_server, channel_credentials(certs)) == b"echo:hi"
    assert _call(tls_server, channel_credentials(certs), host="localhost") == b"echo:hi"


def test_tls_client_with_wrong_ca_fails(other: Path, tls_server: int) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _call(tls_server, channel_credentials(other))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_accepts_client_cert_rejects_missing_and_foreign(
    certs: Path, other: Path, mtls_server: int
) -> None:
    assert _call(mtls_server, channel_credentials(certs, client_name="c1")) == b"echo:hi"
    with pytest.raises(grpc.RpcError) as err:
        _call(mtls_server, channel_credentials(certs))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # a client cert from another CA, trusting our CA: the server must reject it
    foreign = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.crt").read_bytes(),
        private_key=(other / "client" / "c1.key").read_bytes(),
        certificate_chain=(other / "client" / "c1.crt").read_bytes(),
    )
    with pytest.raises(grpc.RpcError) as err2:
        _call(mtls_server, foreign)
    assert err2.value.code() == grpc.StatusCode.UNAVAILABLE
