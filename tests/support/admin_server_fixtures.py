"""A real coordination server on 127.0.0.1 (TLS + HMAC auth, small model) and a signed
scripted Coordinator client, for the admin tests; plus helpers to drive one round."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from crossfed.common.config import ServerConfig
from crossfed.common.crypto.grpc_credentials import channel_credentials
from crossfed.common.crypto.identity import ClientCredential
from crossfed.common.crypto.rpc_auth import authenticated_channel
from crossfed.common.wire.tensor_codec import decode_tensors, encode_tensors
from crossfed.server.admin_servicer import ADMIN_CREDENTIAL_FILE
from crossfed.server.server_app import CoordinatorServer, ServerOptions
from crossfed.v1 import admin_pb2, admin_pb2_grpc, coordinator_pb2, coordinator_pb2_grpc

from tests.support.certificates import make_certs
from tests.support.ports import free_port
from tests.support.scripted_client import ScriptedClient
from tests.support.small_model import SMALL_MODEL

CHUNK = 4096  # small, so a model export streams several chunks


@dataclass
class AdminTestServer:
    """A started server and what a caller needs to reach it."""

    server: CoordinatorServer
    target: str
    certs: Path
    state_dir: Path
    secure: bool

    @property
    def admin_credential(self) -> Path:
        return self.state_dir / ADMIN_CREDENTIAL_FILE

    def cli_args(self) -> list[str]:
        """Connection flags for `crossfed admin ...`."""
        if not self.secure:
            return ["--server", self.target, "--insecure"]
        return [
            "--server",
            self.target,
            "--certs-dir",
            str(self.certs),
            "--credential",
            str(self.admin_credential),
        ]

    def channel(self) -> grpc.Channel:
        if not self.secure:
            return grpc.insecure_channel(self.target)
        return grpc.secure_channel(self.target, channel_credentials(self.certs))

    @contextmanager
    def admin(self) -> Iterator[admin_pb2_grpc.AdminStub]:
        """An Admin stub signed with the server's admin credential."""
        channel = self.channel()
        try:
            signed = channel
            if self.secure:
                signed = authenticated_channel(
                    channel, ClientCredential.load(self.admin_credential)
                )
            yield admin_pb2_grpc.AdminStub(signed)
        finally:
            channel.close()

    def enroll_client(self, client_id: str) -> ClientCredential:
        """Admin makes a token bound to ``client_id``; the client enrolls with it."""
        with self.admin() as stub:
            token = stub.CreateEnrollmentToken(
                admin_pb2.CreateEnrollmentTokenRequest(ttl_s=60, client_id=client_id), timeout=10
            ).token
        with self.channel() as channel:
            enrolled = coordinator_pb2_grpc.CoordinatorStub(channel).Enroll(
                coordinator_pb2.EnrollRequest(enrollment_token=token), timeout=10
            )
        return ClientCredential(enrolled.client_id, bytes(enrolled.client_secret))


def start_server(
    tmp_path: Path,
    *,
    secure: bool = True,
    autostart: bool = True,
    metrics: bool = False,
    mtls: bool = False,
    **rounds: Any,
) -> AdminTestServer:
    """Create and start a server in ``tmp_path`` (stop it with ``.server.stop()``)."""
    certs = tmp_path / "certs"
    if secure and not (certs / "ca.crt").exists():
        make_certs(certs)
    policy: dict[str, Any] = {"rounds": 2, "min_clients": 2, "round_deadline_s": 30.0}
    policy.update(rounds)
    cfg = ServerConfig.model_validate(
        {
            "listen": f"127.0.0.1:{free_port()}",
            "state_dir": str(tmp_path / "state"),
            "model": SMALL_MODEL,
            "rounds": policy,
            "tls": {"cert_dir": str(certs), "mtls": mtls} if secure else {"insecure": True},
            "transport": {"chunk_size": CHUNK, "max_message_bytes": 1024 * 1024},
            "metrics_port": free_port() if metrics else None,
        }
    )
    options = ServerOptions(
        tick_interval_s=0.05,
        allow_unencrypted_uploads=True,
        auto_start=autostart,
        heartbeat_interval_ms=100,
        shutdown_grace_s=0.5,
    )
    server = CoordinatorServer.create(cfg, options)
    port = server.start()
    return AdminTestServer(server, f"127.0.0.1:{port}", certs, tmp_path / "state", secure)


@contextmanager
def running_server(tmp_path: Path, **kw: Any) -> Iterator[AdminTestServer]:
    started = start_server(tmp_path, **kw)
    try:
        yield started
    finally:
        started.server.stop()


class RoundClient(ScriptedClient):
    """A scripted client of an `AdminTestServer` (signed when it has a credential) that
    trains by echoing the global model back, plaintext (the test server allows unencrypted
    uploads)."""

    def __init__(
        self,
        test_server: AdminTestServer,
        client_id: str,
        credential: ClientCredential | None = None,
        num_samples: int = 10,
    ) -> None:
        channel = test_server.channel()
        super().__init__(
            test_server.target,
            client_id,
            num_samples=num_samples,
            chunk_size=CHUNK,
            channel=channel,
            signed=credential is not None,
            stream_timeout_s=30.0,
        )
        if credential is not None:
            self.stub = coordinator_pb2_grpc.CoordinatorStub(
                authenticated_channel(channel, credential)
            )

    def register(  # type: ignore[override]
        self, num_paired: int | None = None, num_text_only: int | None = None
    ) -> coordinator_pb2.RegisterResponse:
        """One text-only sample, the rest paired."""
        return super().register(
            self.num_samples - 1 if num_paired is None else num_paired,
            1 if num_text_only is None else num_text_only,
        )

    def train_and_upload(self, round_no: int, payload: bytes | None = None) -> bool:
        """Download round ``round_no``'s model and upload it back (or ``payload``)."""
        model = self.download_payload(round_no)
        body = payload if payload is not None else encode_tensors(decode_tensors(model))
        response = self.upload(round_no, body, metrics={"acc_both": 0.5})
        return bool(response.accepted)


def run_one_round(clients: list[RoundClient], timeout_s: float = 20.0) -> int:
    """Heartbeat until every client is told TRAIN, then each uploads; returns the round."""
    deadline = time.monotonic() + timeout_s
    pending = {c.client_id: c for c in clients}
    round_no = 0
    while pending:
        if time.monotonic() > deadline:
            raise AssertionError(f"clients {sorted(pending)} were never told to train")
        for cid, client in list(pending.items()):
            hb = client.heartbeat()
            if hb.action == coordinator_pb2.ACTION_TRAIN:
                round_no = int(hb.round)
                assert client.train_and_upload(round_no)
                del pending[cid]
        time.sleep(0.05)
    return round_no


def wait_for(predicate: Any, timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate()`` until true."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
