"""Build the UploadUpdate stream of a local update: one header, then chunks, each encrypted
with the server's per-round X25519 key when the crypto module is available."""

from __future__ import annotations

import hashlib
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from crossfed.common.wire.chunking import split_payload
from crossfed.v1 import common_pb2, coordinator_pb2

log = logging.getLogger(__name__)


class ChunkEncryptor(Protocol):
    """What crossfed.common.crypto.upload_encryption.UploadEncryptor provides."""

    @property
    def client_public_key(self) -> bytes:
        """Ephemeral X25519 public key sent in the upload header."""

    def encrypt_chunk(self, index: int, total: int, plaintext: bytes) -> bytes:
        """AES-256-GCM ciphertext of one chunk, bound to client, round and index."""


EncryptorFactory = Callable[[bytes, str, int], ChunkEncryptor]


def default_encryptor_factory() -> EncryptorFactory | None:
    """The crypto engineer's UploadEncryptor, or None while that module is not installed."""
    try:
        module = importlib.import_module("crossfed.common.crypto.upload_encryption")
    except ImportError:
        return None
    factory: EncryptorFactory | None = getattr(module, "UploadEncryptor", None)
    return factory


@dataclass(frozen=True)
class LocalUpdate:
    """A trained local model, ready to send (eq. 15 needs num_samples = |D_i|)."""

    payload: bytes  # safetensors bytes of the trained weights
    num_samples: int
    module_samples: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    payload_sha256: bytes = b""  # when already known from encode_tensors_with_digest


@dataclass(frozen=True)
class PreparedUpload:
    """The exact message sequence of one upload, kept so a retry resends identical bytes."""

    upload_id: str
    server_public_key: bytes
    messages: tuple[coordinator_pb2.UploadMessage, ...]
    encrypted: bool
    wire_bytes: int


def prepare_upload(
    update: LocalUpdate,
    round_id: int,
    client_id: str,
    upload_id: str,
    chunk_size: int,
    server_public_key: bytes,
    encryptor_factory: EncryptorFactory | None,
) -> PreparedUpload:
    """Header + chunk messages for ``update``; encrypted iff the server announced a key and an
    encryptor is available."""
    digest = update.payload_sha256 or hashlib.sha256(update.payload).digest()
    parts = list(split_payload(update.payload, chunk_size, payload_sha256=digest))
    total = len(parts)
    encryptor: ChunkEncryptor | None = None
    if server_public_key and encryptor_factory is not None:
        encryptor = encryptor_factory(server_public_key, client_id, round_id)
    elif server_public_key:
        log.warning("upload encryption module not available: sending round %d in clear", round_id)
    header = coordinator_pb2.UploadHeader(
        round=round_id,
        client_public_key=encryptor.client_public_key if encryptor else b"",
        num_samples=update.num_samples,
        module_samples=update.module_samples,
        metrics=common_pb2.Metrics(values=update.metrics),
        payload_size=len(update.payload),
        payload_sha256=digest,
        total_chunks=total,
        encrypted=encryptor is not None,
        upload_id=upload_id,
    )
    messages = [coordinator_pb2.UploadMessage(header=header)]
    wire_bytes = 0
    for part in parts:
        data = encryptor.encrypt_chunk(part.index, total, part.data) if encryptor else part.data
        wire_bytes += len(data)
        chunk = common_pb2.TensorChunk(
            index=part.index,
            total=total,
            data=data,
            payload_sha256=digest,
            payload_size=part.payload_size,
            round=round_id,
        )
        messages.append(coordinator_pb2.UploadMessage(chunk=chunk))
    return PreparedUpload(
        upload_id=upload_id,
        server_public_key=server_public_key,
        messages=tuple(messages),
        encrypted=encryptor is not None,
        wire_bytes=wire_bytes,
    )
