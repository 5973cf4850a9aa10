"""Secure mode: TLS with the project CA, enrollment token -> credential, every Coordinator
RPC HMAC-authenticated; the servicer uses the authenticated id, never a claimed one."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from crossfed.common.config import ServerConfig
from crossfed.common.crypto.certificates import create_ca, issue_certificate
from crossfed.common.crypto.grpc_credentials import channel_credentials
from crossfed.common.crypto.identity import (
    ClientCredential,
    create_enrollment_token,
)
from crossfed.common.crypto.rpc_auth import authenticated_channel
from crossfed.common.crypto.upload_encryption import UploadEncryptor
from crossfed.common.wire.tensor_codec import decode_tensors, encode_tensors
from crossfed.server.server_app import CoordinatorServer, ServerOptions
from crossfed.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from grpc_fixtures import SMALL_MODEL, free_port


@pytest.fixture()
def secure_server(tmp_path: Path) -> Iterator[tuple[CoordinatorServer, str, Path]]:
    certs = tmp_path / "certs"
    create_ca(certs)
    issue_certificate(certs, "server", "server")
    cfg = ServerConfig.model_validate(
        {
            "listen": f"127.0.0.1:{free_port()}",
            "state_dir": str(tmp_path / "state"),
            "model": SMALL_MODEL,
            "rounds": {"rounds": 1, "min_clients": 1},
            "tls": {"cert_dir": str(certs)},
        }
    )
    server = CoordinatorServer.create(cfg, ServerOptions(tick_interval_s=0.05))
    port = server.start()
    try:
        yield server, f"localhost:{port}", certs
    finally:
        server.stop()


def test_enroll_then_signed_round_trip(secure_server: tuple[CoordinatorServer, str, Path]) -> None:
    server, target, certs = secure_server
    assert server.credential_store is not None
    token = create_enrollment_token(server.credential_store, ttl_s=60).token.reveal()
    with grpc.secure_channel(target, channel_credentials(certs)) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        # unsigned calls are refused
        with pytest.raises(grpc.RpcError) as err:
            stub.Heartbeat(coordinator_pb2.HeartbeatRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # claiming an id in plain metadata does not help
        with pytest.raises(grpc.RpcError) as err:
            stub.Heartbeat(
                coordinator_pb2.HeartbeatRequest(),
                metadata=(("x-crossfed-client-id", "mallory"),),
                timeout=5,
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        enrolled = stub.Enroll(
            coordinator_pb2.EnrollRequest(enrollment_token=token, requested_client_id="alice"),
            timeout=5,
        )
        assert enrolled.client_id == "alice" and len(enrolled.client_secret) >= 16
        with pytest.raises(grpc.RpcError) as err:  # tokens are one-time
            stub.Enroll(coordinator_pb2.EnrollRequest(enrollment_token=token), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

        cred = ClientCredential("alice", bytes(enrolled.client_secret))
        signed = coordinator_pb2_grpc.CoordinatorStub(authenticated_channel(channel, cred))
        reg = signed.Register(coordinator_pb2.RegisterRequest(modality=1, num_samples=5), timeout=5)  # type: ignore[arg-type]
        assert reg.client_id == "alice"
        hb = signed.Heartbeat(coordinator_pb2.HeartbeatRequest(), timeout=5)
        assert hb.action == coordinator_pb2.ACTION_TRAIN and len(hb.upload_public_key) == 32
        payload = b"".join(
            c.data
            for c in signed.DownloadGlobalModel(
                coordinator_pb2.DownloadRequest(round=1), timeout=30
            )
        )
        update = decode_tensors(payload)
        body = encode_tensors(update)
        enc = UploadEncryptor(bytes(hb.upload_public_key), "alice", 1)
        digest = hashlib.sha256(body).digest()
        msgs = [
            coordinator_pb2.UploadMessage(
                header=coordinator_pb2.UploadHeader(
                    round=1,
                    client_public_key=enc.client_public_key,
                    num_samples=5,
                    payload_size=len(body),
                    payload_sha256=digest,
                    total_chunks=1,
                    encrypted=True,
                    upload_id=uuid.uuid4().hex,
                )
            ),
            coordinator_pb2.UploadMessage(
                chunk=common_pb2.TensorChunk(
                    index=0,
                    total=1,
                    data=enc.encrypt_chunk(0, 1, body),
                    payload_sha256=digest,
                    payload_size=len(body),
                    round=1,
                )
            ),
        ]
        assert signed.UploadUpdate(iter(msgs), timeout=30).accepted
    assert server.engine.wait_idle(30.0)
    assert server.engine.run.state == "completed"
    assert [c.client_id for c in server.engine.clients()] == ["alice"]
