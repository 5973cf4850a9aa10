"""`crossfed deploy health-probe` against real gRPC health servers: plaintext, TLS and mTLS,
SERVING vs NOT_SERVING vs unreachable, and the exit codes a container runtime acts on."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from crossfed.common.config import ServerConfig
from crossfed.common.crypto.grpc_credentials import server_credentials
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from crossfed.cli import app
from crossfed.health_probe import (
    HealthProbeError,
    ProbeTarget,
    check_health,
    dial_address,
    target_from_config,
)
from crossfed.provisioning import PROBE_CERT_NAME
from tests.support.certificates import make_certs
from tests.support.ports import free_port


@dataclass
class HealthServer:
    address: str
    servicer: health.HealthServicer


def _serve(creds: grpc.ServerCredentials | None) -> tuple[grpc.Server, HealthServer]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"127.0.0.1:{free_port()}"
    if creds is None:
        server.add_insecure_port(address)
    else:
        server.add_secure_port(address, creds)
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, HealthServer(address, servicer)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("certs")
    make_certs(root, [PROBE_CERT_NAME])
    return root


@pytest.fixture
def plain() -> Iterator[HealthServer]:
    server, info = _serve(None)
    yield info
    server.stop(None)


def test_serving_not_serving_and_unreachable(plain: HealthServer) -> None:
    target = ProbeTarget(plain.address, insecure=True)
    assert check_health(target).healthy
    plain.servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    result = check_health(target)
    assert (result.healthy, result.status) == (False, "NOT_SERVING")
    gone = check_health(ProbeTarget(f"127.0.0.1:{free_port()}", insecure=True), timeout_s=1)
    assert (gone.healthy, gone.status) == (False, "UNAVAILABLE")


def test_tls_and_mtls(certs: Path) -> None:
    server, info = _serve(server_credentials(certs))
    try:
        assert check_health(ProbeTarget(info.address, cert_dir=certs)).healthy
        assert not check_health(ProbeTarget(info.address, insecure=True), timeout_s=1).healthy
    finally:
        server.stop(None)
    server, info = _serve(server_credentials(certs, require_client_auth=True))
    try:
        assert not check_health(ProbeTarget(info.address, cert_dir=certs), timeout_s=2).healthy
        with_cert = ProbeTarget(info.address, cert_dir=certs, client_cert=PROBE_CERT_NAME)
        assert check_health(with_cert).healthy
    finally:
        server.stop(None)


def test_target_follows_the_servers_config(tmp_path: Path) -> None:
    cfg = ServerConfig.model_validate(
        {"listen": "0.0.0.0:7000", "tls": {"cert_dir": str(tmp_path), "mtls": True}}
    )
    target = target_from_config(cfg, PROBE_CERT_NAME)
    assert target == ProbeTarget("127.0.0.1:7000", False, tmp_path, PROBE_CERT_NAME)
    insecure = ServerConfig.model_validate(
        {"listen": "[::]:7000", "tls": {"insecure": True, "insecure_off_loopback": True}}
    )
    assert target_from_config(insecure, PROBE_CERT_NAME) == ProbeTarget(
        "127.0.0.1:7000", insecure=True
    )
    assert dial_address("server:50051") == "server:50051"
    with pytest.raises(HealthProbeError, match="host:port"):
        dial_address("server")
    with pytest.raises(HealthProbeError, match="not found"):
        check_health(ProbeTarget("127.0.0.1:1", cert_dir=tmp_path / "missing"))


def test_cli_exit_codes(plain: HealthServer, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    monkeypatch.setenv("CROSSFED_TLS__INSECURE", "true")
    monkeypatch.setenv("CROSSFED_TLS__INSECURE_OFF_LOOPBACK", "true")  # as insecure-dev.yml
    monkeypatch.setenv("CROSSFED_LISTEN", f"0.0.0.0:{plain.address.rsplit(':', 1)[1]}")
    ok = runner.invoke(app, ["deploy", "health-probe"])
    assert ok.exit_code == 0 and "SERVING" in ok.output
    dead = runner.invoke(app, ["deploy", "health-probe", "--address", f"127.0.0.1:{free_port()}"])
    assert dead.exit_code == 1
    bad = runner.invoke(app, ["deploy", "health-probe", "--address", "nonsense"])
    assert bad.exit_code == 2 and "expected host:port" in bad.output
    monkeypatch.setenv("CROSSFED_LISTEN", "not an address")
    bad_env = runner.invoke(app, ["deploy", "health-probe"])
    assert bad_env.exit_code == 2 and "CROSSFED_LISTEN" in bad_env.output
