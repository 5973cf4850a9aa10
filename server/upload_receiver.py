"""Turn an UploadUpdate stream (header, then chunks) into verified plaintext bytes: header
sanity, transport policy (encryption required unless allowed), per-chunk AES-GCM
decryption (in place, into the reassembly buffer), reassembly with the wire library's
ChunkAssembler and the SHA-256 check. An encrypted upload that declares no digest gets, for
its record, a SHA-256 of its chunks' AES-GCM tags (or of its plaintext, by policy).
Decoding and tensor validation happen afterwards, before anything touches the model."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from crossfed.common.crypto.upload_encryption import (
    TAG_SIZE,
    UploadDecryptionError,
    UploadDecryptor,
    UploadKeyPair,
)
from crossfed.common.wire.chunk_stream import (
    SHA256_BYTES,
    BufferPool,
    BufferSource,
    ChunkAssembler,
    ChunkFrame,
)
from crossfed.common.wire.errors import PayloadTooLargeError, WireError
from crossfed.server.errors import CorruptPayloadError, InvalidUpdateError, UploadRefusedError
from crossfed.v1 import coordinator_pb2

# Chunks may arrive slightly out of order (the decryptor accepts any order); bound it.
REORDER_WINDOW = 16


def upload_buffer_pool(keep_idle: Callable[[], bool] = lambda: True) -> BufferPool:
    """Reassembly buffers of finished uploads, reused by the next ones (every update of a round
    has the model's size): warm memory instead of ~0.5 ms of page faults and clearing per MiB.
    At most two wait idle (2 x model size), for at most 30 s, and only while ``keep_idle``."""
    return BufferPool(max_idle=2, idle_s=30.0, keep_idle=keep_idle)


@dataclass(frozen=True)
class UploadPolicy:
    """What the server accepts on the wire."""

    max_payload_bytes: int
    allow_unencrypted: bool
    upload_key: UploadKeyPair | None
    # SHA-256 the plaintext of an encrypted upload that declares no digest (record only);
    # off, the record holds AEAD_TAGS_PREFIX + SHA-256 of the chunks' tags in index order.
    hash_encrypted_uploads: bool = False


#: Prefix of an upload record digest computed over the AES-GCM tags instead of the plaintext.
AEAD_TAGS_PREFIX = "aead-tags-sha256:"


def check_header(header: coordinator_pb2.UploadHeader, policy: UploadPolicy) -> None:
    """Reject a header that cannot describe an acceptable upload (before any chunk is read)."""
    digest_len = len(header.payload_sha256)
    if digest_len != SHA256_BYTES and not (header.encrypted and digest_len == 0):
        raise InvalidUpdateError(
            f"upload header payload_sha256 must be {SHA256_BYTES} bytes "
            f"(or empty on an encrypted upload), got {digest_len}"
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


@dataclass(frozen=True)
class ReceivedPayload:
    """A verified upload: the plaintext (a writable view of the reassembly buffer, for
    zero-copy decoding) and the digest for its record: the plaintext's SHA-256 in hex
    (declared and checked, or computed), or AEAD_TAGS_PREFIX + the hex SHA-256 of its
    AES-GCM tags. The tags authenticate every chunk under a key only this server and the
    uploading client hold, so they identify what was folded; unlike a plaintext hash they do
    not bind a client that deliberately crafts a second plaintext with the same tags."""

    view: memoryview
    digest: str


def _as_frame(message: coordinator_pb2.UploadMessage | ChunkFrame) -> ChunkFrame:
    if isinstance(message, ChunkFrame):
        return message
    if message.WhichOneof("kind") != "chunk":
        raise InvalidUpdateError("a second upload header arrived inside the chunk stream")
    return ChunkFrame.from_proto(message.chunk)


def receive_payload(
    header: coordinator_pb2.UploadHeader,
    messages: Iterator[coordinator_pb2.UploadMessage | ChunkFrame],
    policy: UploadPolicy,
    client_id: str,
    before_chunk: Callable[[int], None] | None = None,
    buffer_pool: BufferSource | None = None,
) -> ReceivedPayload:
    """Consume the chunk messages after the header; return the verified plaintext payload.
    ``before_chunk(n)`` runs as each chunk of n bytes arrives, before it is placed (the
    server admits bytes in flight as they arrive and watches the stream for stalls).
    ``buffer_pool`` supplies the reassembly buffer (None: a fresh one).

    Each chunk goes through the same checks as before (framing, then placement, then
    AES-GCM authentication of the chunk with client, round, index and total bound), and is
    decrypted straight into its place in the payload buffer: one pass over the bytes. An
    encrypted upload may omit the whole-payload digest (every chunk is authenticated); the
    payload is hashed anyway, off the receiving thread, for the upload record.
    """
    decryptor: UploadDecryptor | None = None
    if header.encrypted:
        assert policy.upload_key is not None
        try:
            decryptor = UploadDecryptor(
                policy.upload_key, bytes(header.client_public_key), client_id, int(header.round)
            )
        except UploadDecryptionError as exc:
            raise InvalidUpdateError(f"cannot set up upload decryption: {exc}") from exc
    header_digest = bytes(header.payload_sha256)
    # An undeclared digest: the record gets the tags' digest unless the policy asks to hash.
    tags: list[bytes] | None = (
        [b""] * int(header.total_chunks)
        if decryptor is not None and not header_digest and not policy.hash_encrypted_uploads
        else None
    )
    assembler = ChunkAssembler(
        max_payload_bytes=policy.max_payload_bytes,
        reorder_window=REORDER_WINDOW,
        require_digest=decryptor is None,
        hash_undeclared=tags is None,
        buffer_pool=buffer_pool,
    )
    for message in messages:
        chunk = _as_frame(message)
        if before_chunk is not None:
            before_chunk(len(chunk.data))
        where = f"chunk {chunk.index}/{chunk.total}"
        if chunk.total != header.total_chunks:
            raise CorruptPayloadError(
                f"{where}: total {chunk.total} differs from the header's {header.total_chunks}"
            )
        if chunk.round and chunk.round != header.round:
            raise InvalidUpdateError(
                f"{where} belongs to round {chunk.round}, the header says round {header.round}"
            )
        if chunk.payload_sha256 != header_digest or chunk.payload_size != header.payload_size:
            raise CorruptPayloadError(f"{where}: payload digest/size differ from the header's")
        _add_chunk(assembler, decryptor, chunk)
        if tags is not None:  # authenticated and placed: keep its tag
            tags[chunk.index] = bytes(chunk.data[len(chunk.data) - TAG_SIZE :])
    if not assembler.complete:
        got = assembler.received_chunks
        raise CorruptPayloadError(
            f"upload stream ended after {got} of {header.total_chunks} chunks (truncated); "
            "send the upload again"
        )
    try:
        view = assembler.result_view(writable=True)
        sha256 = assembler.sha256()
    except WireError as exc:
        raise CorruptPayloadError(f"upload payload failed verification: {exc}") from exc
    if sha256 is not None:
        return ReceivedPayload(view, sha256.hex())
    assert tags is not None
    return ReceivedPayload(view, AEAD_TAGS_PREFIX + hashlib.sha256(b"".join(tags)).hexdigest())


def _add_chunk(
    assembler: ChunkAssembler, decryptor: UploadDecryptor | None, chunk: ChunkFrame
) -> None:
    """Place one chunk (decrypting it in place); map failures onto the server's errors with
    the precedence of decrypt-then-assemble: an unauthentic chunk is INVALID_ARGUMENT."""
    data = chunk.data
    index, total = chunk.index, chunk.total
    length = len(data)
    write: Callable[[memoryview], object]
    if decryptor is None:

        def write(out: memoryview) -> None:
            out[:] = data

    else:
        try:
            decryptor.check_chunk(index, total, data)  # index, total, replay, tag length
        except UploadDecryptionError as exc:
            raise InvalidUpdateError(f"upload decryption failed: {exc}") from exc
        length -= TAG_SIZE

        def write(out: memoryview) -> None:
            decryptor.decrypt_chunk_into(index, total, data, out)

    try:
        assembler.add_into(index, total, length, chunk.payload_sha256, chunk.payload_size, write)
    except UploadDecryptionError as exc:
        raise InvalidUpdateError(f"upload decryption failed: {exc}") from exc
    except PayloadTooLargeError as exc:
        raise InvalidUpdateError(str(exc)) from exc
    except WireError as exc:
        if decryptor is not None:  # rejected before decryption: is it authentic at all?
            try:
                decryptor.decrypt_chunk(index, total, data)
            except UploadDecryptionError as auth:
                raise InvalidUpdateError(f"upload decryption failed: {auth}") from exc
        raise CorruptPayloadError(f"upload stream rejected: {exc}") from exc
