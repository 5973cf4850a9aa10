"""gRPC health check (grpc.health.v1) of a crossfed server, for container health checks and
Kubernetes exec probes: no downloaded grpc_health_probe binary, same TLS settings as the
server it checks (read from the server's own config/env)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from crossfed.common.config import ServerConfig

#: Listen addresses that mean "every interface": the probe dials loopback instead.
_WILDCARD_HOSTS = ("0.0.0.0", "[::]", "::", "")
_HOST_PORT = re.compile(r"^(?P<host>\[[^\]]*\]|[^:]*):(?P<port>\d+)$")


class HealthProbeError(Exception):
    """The probe's own input is wrong (bad address, unreadable certificates)."""


@dataclass(frozen=True)
class ProbeTarget:
    """Where and how to dial: plaintext, TLS trusting ``cert_dir``'s CA, or mTLS with the
    client certificate ``client_cert`` from ``cert_dir``."""

    address: str
    insecure: bool = False
    cert_dir: Path | None = None
    client_cert: str | None = None
    service: str = ""


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of one check: ``healthy`` only when the server answered SERVING."""

    healthy: bool
    status: str
    detail: str = ""


def dial_address(listen: str) -> str:
    """The address a local probe dials for a server listening on ``listen``."""
    match = _HOST_PORT.match(listen)
    if match is None:
        raise HealthProbeError(f"address {listen!r}: expected host:port")
    host = match.group("host")
    if host in _WILDCARD_HOSTS:
        host = "127.0.0.1"
    return f"{host}:{match.group('port')}"


def target_from_config(config: ServerConfig, probe_cert: str) -> ProbeTarget:
    """Probe the server described by ``config`` from inside its own container/pod."""
    return ProbeTarget(
        address=dial_address(config.listen),
        insecure=config.tls.insecure,
        cert_dir=None if config.tls.insecure else Path(config.tls.cert_dir),
        client_cert=probe_cert if config.tls.mtls and not config.tls.insecure else None,
    )


def check_health(target: ProbeTarget, timeout_s: float = 3.0) -> ProbeResult:
    """One Health/Check call; unreachable, TLS failure or NOT_SERVING all give healthy=False."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from crossfed.common.crypto.certificates import CertificateError
    from crossfed.common.crypto.grpc_credentials import channel_credentials

    if target.insecure:
        channel = grpc.insecure_channel(target.address)
    else:
        if target.cert_dir is None:
            raise HealthProbeError("TLS probe needs the certificates directory (ca.crt)")
        try:
            creds = channel_credentials(target.cert_dir, client_name=target.client_cert)
        except CertificateError as exc:
            raise HealthProbeError(str(exc)) from None
        channel = grpc.secure_channel(target.address, creds)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(
            health_pb2.HealthCheckRequest(service=target.service), timeout=timeout_s
        )
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        name = code.name if code is not None else "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return ProbeResult(False, name, str(details or ""))
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return ProbeResult(response.status == health_pb2.HealthCheckResponse.SERVING, status)
