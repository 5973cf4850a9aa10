"""Turn an UploadUpdate stream (header, then chunks) into verified plaintext bytes: header
sanity, transport policy (encryption required unless allowed), per-chunk AES-GCM
decryption, reassembly with the wire library's ChunkAssembler and the SHA-256 check.
Decoding and tensor validation happen afterwards, before anything touches the model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from crossfed.common.crypto.upload_encryption import (
    UploadDecryptionError,
    UploadDecryptor,
    UploadKeyPair,
)
from crossfed.common.wire.chunking import SHA256_BYTES, Chunk, ChunkAssembler
from crossfed.common.wire.errors import PayloadTooLargeError, WireError
from crossfed.server.errors import CorruptPayloadError, InvalidUpdateError, UploadRefusedError
from crossfed.v1 import coordinator_pb2

# Chunks may arrive slightly out of order (the decryptor accepts any order); bound it.
REORDER_WINDOW = 16


@dataclass(frozen=True)
class UploadPolicy:
    """What the server accepts on the wire."""

    max_payload_bytes: int
    allow_unencrypted: bool
    upload_key: UploadKeyPair | None


def check_header(header: coordinator_pb2.UploadHeader, policy: UploadPolicy) -> None:
    """Reject a header that cannot describe an acceptable upload (before any chunk is read)."""
    if len(header.payload_sha256) != SHA256_BYTES:
        raise InvalidUpdateError(
            f"upload header payload_sha256 must be {SHA256_BYTES} bytes, "
            f"got {len(header.payload_sha256)}"
        )
    if header.payload_size > policy.max_payload_bytes:
        raise InvalidUpdateError(
            f"upload of {header.payload_size} bytes exceeds the server limit of "
            f"{policy.max_payload_bytes} bytes (transport.max_payload_bytes)"
        )
    if header.total_chunks < 1:
        raise InvalidUpdateError("upload header total_chunks must be >= 1")
    if header.encrypted:
        if policy.upload_key is None:
            raise UploadRefusedError("this server has no upload key; it cannot decrypt uploads")
        if not header.client_public_key:
            raise InvalidUpdateError("encrypted upload without client_public_key")
    elif not policy.allow_unencrypted:
        raise UploadRefusedError(
            "unencrypted uploads are refused: encrypt with the upload_public_key announced by "
            "Heartbeat (the server allows plaintext only in insecure/test mode)"
        )


def receive_payload(
    header: coordinator_pb2.UploadHeader,
    messages: Iterator[coordinator_pb2.UploadMessage],
    policy: UploadPolicy,
    client_id: str,
) -> memoryview:
    """Consume the chunk messages after the header; return the verified plaintext payload (a
    writable view of the reassembly buffer, for zero-copy decoding)."""
    decryptor: UploadDecryptor | None = None
    if header.encrypted:
        assert policy.upload_key is not None
        try:
            decryptor = UploadDecryptor(
                policy.upload_key, bytes(header.client_public_key), client_id, int(header.round)
            )
        except UploadDecryptionError as exc:
            raise InvalidUpdateError(f"cannot set up upload decryption: {exc}") from exc
    assembler = ChunkAssembler(
        max_payload_bytes=policy.max_payload_bytes, reorder_window=REORDER_WINDOW
    )
    for message in messages:
        if message.WhichOneof("kind") != "chunk":
            raise InvalidUpdateError("a second upload header arrived inside the chunk stream")
        chunk = message.chunk
        where = f"chunk {chunk.index}/{chunk.total}"
        if chunk.total != header.total_chunks:
            raise CorruptPayloadError(
                f"{where}: total {chunk.total} differs from the header's {header.total_chunks}"
            )
        if chunk.round and chunk.round != header.round:
            raise InvalidUpdateError(
                f"{where} belongs to round {chunk.round}, the header says round {header.round}"
            )
        if (
            chunk.payload_sha256 != header.payload_sha256
            or chunk.payload_size != header.payload_size
        ):
            raise CorruptPayloadError(f"{where}: payload digest/size differ from the header's")
        data = bytes(chunk.data)
        if decryptor is not None:
            try:
                data = decryptor.decrypt_chunk(int(chunk.index), int(chunk.total), data)
            except UploadDecryptionError as exc:
                raise InvalidUpdateError(f"upload decryption failed: {exc}") from exc
        try:
            assembler.add(
                Chunk(
                    int(chunk.index),
                    int(chunk.total),
                    data,
                    bytes(chunk.payload_sha256),
                    int(chunk.payload_size),
                )
            )
        except PayloadTooLargeError as exc:
            raise InvalidUpdateError(str(exc)) from exc
        except WireError as exc:
            raise CorruptPayloadError(f"upload stream rejected: {exc}") from exc
    if not assembler.complete:
        got = assembler.received_chunks
        raise CorruptPayloadError(
            f"upload stream ended after {got} of {header.total_chunks} chunks (truncated); "
            "send the upload again"
        )
    try:
        return assembler.result_view(writable=True)
    except WireError as exc:
        raise CorruptPayloadError(f"upload payload failed verification: {exc}") from exc
