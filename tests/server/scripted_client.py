"""A minimal scripted Coordinator client built from the generated stubs (no client daemon):
register, heartbeat, download, (encrypted) upload, projections. For server tests only."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import torch
from crossfed.common.crypto.upload_encryption import UploadEncryptor
from crossfed.common.wire.tensor_codec import decode_tensors, encode_tensors
from crossfed.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

CHUNK = 64 * 1024


@dataclass
class ScriptedClient:
    """One fake client on an insecure channel, identified by the x-crossfed-client-id header."""

    target: str
    client_id: str
    modality: int = 1
    num_samples: int = 10
    max_message_bytes: int = 8 * 1024 * 1024
    channel: grpc.Channel = field(init=False)
    stub: coordinator_pb2_grpc.CoordinatorStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(
            self.target,
            options=[
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes),
                # reconnect fast after a server restart (tests kill and restart it)
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 300),
            ],
        )
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return (("x-crossfed-client-id", self.client_id),)

    def close(self) -> None:
        self.channel.close()

    def register(self) -> coordinator_pb2.RegisterResponse:
        return self.stub.Register(
            coordinator_pb2.RegisterRequest(
                modality=self.modality,
                num_samples=self.num_samples,  # type: ignore[arg-type]
            ),
            metadata=self.md,
            timeout=10,
        )

    def heartbeat(self) -> coordinator_pb2.HeartbeatResponse:
        return self.stub.Heartbeat(coordinator_pb2.HeartbeatRequest(), metadata=self.md, timeout=10)

    def download(self, round_no: int) -> dict[str, torch.Tensor]:
        parts = []
        digest = b""
        for chunk in self.stub.DownloadGlobalModel(
            coordinator_pb2.DownloadRequest(round=round_no), metadata=self.md, timeout=60
        ):
            parts.append(chunk.data)
            digest = chunk.payload_sha256
        payload = b"".join(parts)
        assert hashlib.sha256(payload).digest() == digest
        return decode_tensors(payload)

    def upload_messages(
        self,
        round_no: int,
        state: dict[str, torch.Tensor] | bytes,
        *,
        server_key: bytes = b"",
        upload_id: str | None = None,
        module_samples: dict[str, int] | None = None,
        num_samples: int | None = None,
        chunk_size: int = CHUNK,
        drop_last_chunk: bool = False,
        corrupt_digest: bool = False,
    ) -> list[coordinator_pb2.UploadMessage]:
        payload = state if isinstance(state, bytes) else encode_tensors(state)
        digest = hashlib.sha256(payload).digest()
        if corrupt_digest:
            digest = hashlib.sha256(b"something else").digest()
        total = max(1, -(-len(payload) // chunk_size))
        encryptor = UploadEncryptor(server_key, self.client_id, round_no) if server_key else None
        header = coordinator_pb2.UploadHeader(
            round=round_no,
            client_public_key=encryptor.client_public_key if encryptor else b"",
            num_samples=self.num_samples if num_samples is None else num_samples,
            module_samples=module_samples or {},
            payload_size=len(payload),
            payload_sha256=digest,
            total_chunks=total,
            encrypted=encryptor is not None,
            upload_id=upload_id or uuid.uuid4().hex,
        )
        messages = [coordinator_pb2.UploadMessage(header=header)]
        for index in range(total):
            data = payload[index * chunk_size : (index + 1) * chunk_size]
            if encryptor is not None:
                data = encryptor.encrypt_chunk(index, total, data)
            messages.append(
                coordinator_pb2.UploadMessage(
                    chunk=common_pb2.TensorChunk(
                        index=index,
                        total=total,
                        data=data,
                        payload_sha256=digest,
                        payload_size=len(payload),
                        round=round_no,
                    )
                )
            )
        if drop_last_chunk:
            messages.pop()
        return messages

    def upload(
        self, round_no: int, state: dict[str, torch.Tensor] | bytes, **kw: object
    ) -> coordinator_pb2.UploadResponse:
        messages = self.upload_messages(round_no, state, **kw)  # type: ignore[arg-type]

        def gen() -> Iterator[coordinator_pb2.UploadMessage]:
            yield from messages

        return self.stub.UploadUpdate(gen(), metadata=self.md, timeout=120)

    def exchange(
        self,
        round_no: int,
        payload: bytes,
        epsilon: float = 0.0,
        noise_multiplier: float = 0.0,
        clip_norm: float = 0.0,
    ) -> coordinator_pb2.ProjectionExchangeResponse:
        return self.stub.ExchangeProjections(
            coordinator_pb2.ProjectionExchangeRequest(
                round=round_no,
                projections=common_pb2.TensorPayload(
                    safetensors=payload, payload_sha256=hashlib.sha256(payload).digest()
                ),
                epsilon_spent=epsilon,
                noise_multiplier=noise_multiplier,
                clip_norm=clip_norm,
            ),
            metadata=self.md,
            timeout=10,
        )
