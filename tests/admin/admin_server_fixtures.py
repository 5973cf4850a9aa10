"""A real coordination server on 127.0.0.1 (TLS + HMAC auth, small model) and a signed
scripted Coordinator client, for the admin tests; plus helpers to drive one round."""

from __future__ import annotations

import hashlib
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from crossfed.common.config import ServerConfig
from crossfed.common.crypto.certificates import create_ca, issue_certificate
from crossfed.common.crypto.grpc_credentials import channel_credentials
from crossfed.common.crypto.identity import ClientCredential
from crossfed.common.crypto.rpc_auth import authenticated_channel
from crossfed.common.wire.tensor_codec import decode_tensors, encode_tensors
from crossfed.server.admin_servicer import ADMIN_CREDENTIAL_FILE
from crossfed.server.server_app import CoordinatorServer, ServerOptions
from crossfed.v1 import admin_pb2, admin_pb2_grpc, common_pb2, coordinator_pb2, coordinator_pb2_grpc

SMALL_MODEL = {"text_dim": 16, "image_dim": 8, "hidden_dim": 16, "num_classes": 3}
CHUNK = 4096  # small, so a model export streams several chunks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        create_ca(certs)
        issue_certificate(certs, "server", "server")
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


@dataclass
class RoundClient:
    """A Coordinator client (signed when it has a credential) that trains by echoing the
    global model back, plaintext (the test server allows unencrypted uploads)."""

    test_server: AdminTestServer
    client_id: str
    credential: ClientCredential | None = None
    num_samples: int = 10
    channel: grpc.Channel = field(init=False)
    stub: coordinator_pb2_grpc.CoordinatorStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = self.test_server.channel()
        target = self.channel
        if self.credential is not None:
            target = authenticated_channel(self.channel, self.credential)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(target)

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return () if self.credential is not None else (("x-crossfed-client-id", self.client_id),)

    def close(self) -> None:
        self.channel.close()

    def register(self) -> None:
        self.stub.Register(
            coordinator_pb2.RegisterRequest(  # type: ignore[arg-type]
                modality=1,
                num_samples=self.num_samples,
                num_paired=self.num_samples - 1,
                num_text_only=1,
            ),
            metadata=self.md,
            timeout=10,
        )

    def heartbeat(self) -> coordinator_pb2.HeartbeatResponse:
        return self.stub.Heartbeat(coordinator_pb2.HeartbeatRequest(), metadata=self.md, timeout=10)

    def train_and_upload(self, round_no: int, payload: bytes | None = None) -> bool:
        """Download round ``round_no``'s model and upload it back (or ``payload``)."""
        model = b"".join(
            c.data
            for c in self.stub.DownloadGlobalModel(
                coordinator_pb2.DownloadRequest(round=round_no), metadata=self.md, timeout=30
            )
        )
        body = payload if payload is not None else encode_tensors(decode_tensors(model))
        digest = hashlib.sha256(body).digest()
        total = max(1, -(-len(body) // CHUNK))
        messages = [
            coordinator_pb2.UploadMessage(
                header=coordinator_pb2.UploadHeader(
                    round=round_no,
                    num_samples=self.num_samples,
                    payload_size=len(body),
                    payload_sha256=digest,
                    total_chunks=total,
                    encrypted=False,
                    upload_id=uuid.uuid4().hex,
                    metrics=common_pb2.Metrics(values={"acc_both": 0.5}),
                )
            )
        ]
        for index in range(total):
            messages.append(
                coordinator_pb2.UploadMessage(
                    chunk=common_pb2.TensorChunk(
                        index=index,
                        total=total,
                        data=body[index * CHUNK : (index + 1) * CHUNK],
                        payload_sha256=digest,
                        payload_size=len(body),
                        round=round_no,
                    )
                )
            )
        response = self.stub.UploadUpdate(iter(messages), metadata=self.md, timeout=30)
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
