"""The one scripted Coordinator client of the test suites, built from the generated stubs (no
client daemon): register, heartbeat, download, (encrypted) upload, projections. Suites that
need a client with a particular behaviour (known-constant uploads, echoing the model back)
subclass it rather than talk to the stubs themselves."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import grpc
import torch
from crossfed.common.crypto.upload_encryption import UploadEncryptor
from crossfed.common.wire.tensor_codec import decode_tensors, encode_tensors
from crossfed.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

CHUNK = 64 * 1024


@dataclass
class ScriptedClient:
    """One fake client. Without ``channel`` it opens an insecure one; unless ``signed`` (the
    channel carries the signing interceptor) it names itself in the x-crossfed-client-id
    header, as the server's insecure mode expects."""

    target: str
    client_id: str
    modality: int = 1
    num_samples: int = 10
    max_message_bytes: int = 8 * 1024 * 1024
    chunk_size: int = CHUNK
    channel: grpc.Channel | None = None
    signed: bool = False
    grpc_retries: bool = True  # False: every transient failure surfaces to the caller
    stream_timeout_s: float = 120.0  # download and upload deadline
    stub: coordinator_pb2_grpc.CoordinatorStub = field(init=False)

    def __post_init__(self) -> None:
        if self.channel is None:
            options: list[tuple[str, int]] = [
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes),
                # reconnect fast after a server restart (tests kill and restart it)
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 300),
            ]
            if not self.grpc_retries:
                options.append(("grpc.enable_retries", 0))
            self.channel = grpc.insecure_channel(self.target, options=options)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return () if self.signed else (("x-crossfed-client-id", self.client_id),)

    def close(self) -> None:
        assert self.channel is not None
        self.channel.close()

    def register(
        self, num_paired: int | None = None, num_text_only: int | None = None
    ) -> coordinator_pb2.RegisterResponse:
        return self.stub.Register(
            coordinator_pb2.RegisterRequest(  # type: ignore[arg-type]
                modality=self.modality,
                num_samples=self.num_samples,
                num_paired=num_paired,
                num_text_only=num_text_only,
            ),
            metadata=self.md,
            timeout=10,
        )

    def heartbeat(self) -> coordinator_pb2.HeartbeatResponse:
        return self.stub.Heartbeat(coordinator_pb2.HeartbeatRequest(), metadata=self.md, timeout=10)

    def wait_action(
        self, action: int, timeout_s: float = 30.0
    ) -> coordinator_pb2.HeartbeatResponse:
        """Heartbeat until the server answers ``action``."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            hb = self.heartbeat()
            if hb.action == action:
                return hb
            time.sleep(0.05)
        raise AssertionError(f"{self.client_id}: no action {action} within {timeout_s} s")

    def download_payload(self, round_no: int) -> bytes:
        """Round ``round_no``'s global model as sent (safetensors bytes), digest checked."""
        parts = []
        digest = b""
        for chunk in self.stub.DownloadGlobalModel(
            coordinator_pb2.DownloadRequest(round=round_no),
            metadata=self.md,
            timeout=self.stream_timeout_s,
        ):
            parts.append(chunk.data)
            digest = chunk.payload_sha256
        payload = b"".join(parts)
        if hashlib.sha256(payload).digest() != digest:
            raise AssertionError(f"{self.client_id}: downloaded model fails its digest")
        return payload

    def download(self, round_no: int) -> dict[str, torch.Tensor]:
        return decode_tensors(self.download_payload(round_no))

    def upload_messages(
        self,
        round_no: int,
        state: Mapping[str, torch.Tensor] | bytes,
        *,
        server_key: bytes = b"",
        upload_id: str | None = None,
        module_samples: dict[str, int] | None = None,
        num_samples: int | None = None,
        chunk_size: int | None = None,
        metrics: dict[str, float] | None = None,
        drop_last_chunk: bool = False,
        corrupt_digest: bool = False,
    ) -> list[coordinator_pb2.UploadMessage]:
        """The UploadUpdate stream for ``state``: header, then (encrypted) chunks."""
        payload = state if isinstance(state, bytes) else encode_tensors(dict(state))
        size = chunk_size or self.chunk_size
        digest = hashlib.sha256(payload).digest()
        if corrupt_digest:
            digest = hashlib.sha256(b"something else").digest()
        total = max(1, -(-len(payload) // size))
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
            metrics=common_pb2.Metrics(values=metrics) if metrics else None,
        )
        messages = [coordinator_pb2.UploadMessage(header=header)]
        for index in range(total):
            data = payload[index * size : (index + 1) * size]
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
        self, round_no: int, state: Mapping[str, torch.Tensor] | bytes, **kw: object
    ) -> coordinator_pb2.UploadResponse:
        messages = self.upload_messages(round_no, state, **kw)  # type: ignore[arg-type]

        def gen() -> Iterator[coordinator_pb2.UploadMessage]:
            yield from messages

        return self.stub.UploadUpdate(gen(), metadata=self.md, timeout=self.stream_timeout_s)

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
