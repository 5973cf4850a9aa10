"""What the hostile-client scenarios share: a real coordination server in this process with
the production defaults (TLS, enrollment and signed RPCs, the update bound, the projection-DP
mandate; only the model is small and plaintext uploads are allowed, the attacks are about
content, not transport encryption), restartable on its state dir; enrolled clients that sign
every call with the real interceptor; a recorder of the metadata a call really sent (for
replays); and the attack records RELIABILITY.md's "attacks" table is written from."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from crossfed.common.config import ServerConfig
from crossfed.common.crypto.certificates import issue_certificate
from crossfed.common.crypto.grpc_credentials import channel_credentials
from crossfed.common.crypto.identity import ClientCredential
from crossfed.common.crypto.rpc_auth import authenticated_channel
from crossfed.server.admin_servicer import ADMIN_CREDENTIAL_FILE
from crossfed.server.server_app import CoordinatorServer, ServerOptions
from crossfed.v1 import admin_pb2, admin_pb2_grpc, coordinator_pb2, coordinator_pb2_grpc

from tests.support.certificates import make_certs
from tests.support.ports import free_port
from tests.support.reliability.reliability_harness import (
    LightClient,
    record_result,
)
from tests.support.small_model import SMALL_MODEL


def record_attack(name: str, attempt: str, expected: str, observed: str) -> None:
    """One row of RELIABILITY.md's attacks table (written only when the scenario held)."""
    record_result(f"attack_{name}", attempt=attempt, expected=expected, observed=_untemp(observed))


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    """The RpcError ``call`` raises (fails the test if it succeeds)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call was expected to fail but succeeded")


def status(exc: grpc.RpcError) -> str:
    """'CODE: details' of a failed call, for the attacks table."""
    return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]


@dataclass
class AttackServer:
    """A started server (TLS, authenticated) and how to reach, restart and administer it."""

    config: ServerConfig
    options: ServerOptions
    certs: Path
    port: int
    server: CoordinatorServer | None = None
    clients: list[LightClient] = field(default_factory=list)
    admin_cert: str | None = None  # the operator's certificate under mTLS

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"

    @property
    def state_dir(self) -> Path:
        return Path(self.config.state_dir)

    @property
    def engine(self) -> Any:
        assert self.server is not None
        return self.server.engine

    def start(self) -> None:
        self.server = CoordinatorServer.create(self.config, self.options)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def restart(self) -> None:
        """Stop and start again on the same port and state dir (a crash-free restart)."""
        self.stop()
        self.start()

    def channel(self, client_cert: str | None = None, role: str = "client") -> grpc.Channel:
        creds = channel_credentials(self.certs, client_cert, role=role)
        return grpc.secure_channel(self.target, creds)

    @contextmanager
    def admin(self) -> Iterator[admin_pb2_grpc.AdminStub]:
        """An Admin stub signed with the operator's credential."""
        credential = ClientCredential.load(self.state_dir / ADMIN_CREDENTIAL_FILE)
        channel = self.channel(self.admin_cert, role="admin")
        try:
            yield admin_pb2_grpc.AdminStub(authenticated_channel(channel, credential))
        finally:
            channel.close()

    def token(self, client_id: str) -> str:
        with self.admin() as stub:
            return str(
                stub.CreateEnrollmentToken(
                    admin_pb2.CreateEnrollmentTokenRequest(ttl_s=60, client_id=client_id),
                    timeout=10,
                ).token
            )

    def enroll(self, client_id: str, cert: str | None = None) -> ClientCredential:
        """Enroll ``client_id`` with an admin-made token bound to it."""
        token = self.token(client_id)
        with self.channel(cert) as channel:
            reply = coordinator_pb2_grpc.CoordinatorStub(channel).Enroll(
                coordinator_pb2.EnrollRequest(enrollment_token=token), timeout=10
            )
        return ClientCredential(reply.client_id, bytes(reply.client_secret))

    def client(
        self,
        client_id: str,
        index: int,
        credential: ClientCredential | None = None,
        cert: str | None = None,
    ) -> LightClient:
        """An enrolled client whose every call is signed by the real interceptor."""
        credential = credential or self.enroll(client_id, cert)
        channel = authenticated_channel(self.channel(cert), credential)
        client = LightClient(
            self.target, credential.client_id, index=index, channel=channel, signed=True
        )
        self.clients.append(client)
        return client


@contextmanager
def attack_server(
    tmp_path: Path,
    sections: dict[str, Any] | None = None,
    client_certs: tuple[str, ...] = (),
    admin_cert: str | None = None,
    **rounds: Any,
) -> Iterator[AttackServer]:
    """A production-default server (see module docstring) on 127.0.0.1; ``sections``
    replaces whole config sections, ``rounds`` sets round-policy values; ``client_certs``
    and ``admin_cert`` are issued (for mTLS)."""
    certs = tmp_path / "certs"
    make_certs(certs, client_certs)
    if admin_cert is not None:
        issue_certificate(certs, "admin", admin_cert)
    policy: dict[str, Any] = {"rounds": 3, "min_clients": 2, "round_deadline_s": 30.0}
    policy.update(rounds)
    port = free_port()
    config = ServerConfig.model_validate(
        {
            "listen": f"127.0.0.1:{port}",
            "state_dir": str(tmp_path / "state"),
            "model": SMALL_MODEL,
            "rounds": policy,
            "tls": {"cert_dir": str(certs)},
            "transport": {"chunk_size": 1024, "max_message_bytes": 1024 * 1024},
            **(sections or {}),
        }
    )
    options = ServerOptions(
        tick_interval_s=0.05,
        heartbeat_interval_ms=100,
        allow_unencrypted_uploads=True,
        shutdown_grace_s=0.5,
    )
    started = AttackServer(config, options, certs, port, admin_cert=admin_cert)
    started.start()
    try:
        yield started
    finally:
        for client in started.clients:
            client.close()
        started.stop()


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` every 20 ms until true; fail naming ``what`` after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def wait_train(client: LightClient, round_no: int, timeout_s: float = 30.0) -> bytes:
    """Heartbeat until ``client`` is told to train ``round_no``; returns the upload key."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        hb = client.heartbeat()
        if hb.action == coordinator_pb2.ACTION_TRAIN and hb.round == round_no:
            return bytes(hb.upload_public_key)
        time.sleep(0.05)
    raise AssertionError(f"{client.client_id} was not told to train round {round_no}")


class MetadataRecorder(grpc.UnaryUnaryClientInterceptor):
    """Remembers the metadata of the last unary call that went through it (what the signing
    interceptor added: an eavesdropper's copy of a signed request). With ``hold`` the call
    is not sent at all (a signed request nobody has used yet)."""

    def __init__(self, hold: bool = False) -> None:
        self.metadata: tuple[tuple[str, str], ...] = ()
        self.hold = hold

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.metadata = tuple(details.metadata or ())
        if self.hold:
            raise HeldCall(details.method)
        return continuation(details, request)


class HeldCall(Exception):
    """A call `MetadataRecorder(hold=True)` signed but did not send."""


def _untemp(text: str) -> str:
    """Drop pytest's temporary directory from a message (the table shows what, not where)."""
    return re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/(popen-gw\d+/)?[^/ ]+/", "<tmp>/", text)
