"""Build the UploadUpdate stream of a local update: one header, then chunks, each encrypted
with the server's per-round X25519 key (when the server published one).

Chunks are produced lazily, one at a time, while gRPC sends the previous ones: encryption
overlaps the transfer and no encrypted copy of the whole update is ever held. Over gRPC the
chunks go out pre-framed (``wire_frames``): the ciphertext is written once, behind its
protobuf framing, into a reused buffer, then copied once into the message gRPC sends.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from crossfed.common.crypto.upload_encryption import TAG_SIZE, UploadEncryptor
from crossfed.common.wire.chunk_stream import upload_chunk_prefix
from crossfed.v1 import common_pb2, coordinator_pb2

log = logging.getLogger(__name__)

#: AES-GCM tag appended to every encrypted chunk (crossfed.common.crypto.upload_encryption).


class ChunkEncryptor(Protocol):
    """What crossfed.common.crypto.upload_encryption.UploadEncryptor provides."""

    @property
    def client_public_key(self) -> bytes:
        """Ephemeral X25519 public key sent in the upload header."""

    def encrypt_chunk(self, index: int, total: int, plaintext: bytes | memoryview) -> bytes:
        """AES-256-GCM ciphertext of one chunk, bound to client, round and index."""

    def encrypt_chunk_into(
        self, index: int, total: int, plaintext: bytes | memoryview, out: bytearray | memoryview
    ) -> int:
        """The same ciphertext written into ``out`` (exactly plaintext + tag bytes)."""


EncryptorFactory = Callable[[bytes, str, int], ChunkEncryptor]


def default_encryptor_factory() -> EncryptorFactory:
    """UploadEncryptor: X25519 + AES-GCM per chunk against the server's round key."""
    return UploadEncryptor


@dataclass(frozen=True)
class LocalUpdate:
    """A trained local model, ready to send (eq. 15 needs num_samples = |D_i|)."""

    payload: bytes  # safetensors bytes of the trained weights
    num_samples: int
    module_samples: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    payload_sha256: bytes = b""  # when already known from encode_tensors_with_digest
    # Shown and logged on the client, never uploaded (e.g. losses/accuracies under DP-SGD,
    # whose release the privacy guarantee does not cover).
    local_metrics: dict[str, float] = field(default_factory=dict)


class UploadAttempt:
    """One pass over the upload stream: the header, then every chunk, made on demand.

    Iterating yields protobuf ``UploadMessage``s (any transport); ``wire_frames`` yields the
    same messages already serialized (the gRPC transport's fast path). Use one or the other,
    once. An encrypted attempt has its own encryptor, i.e. a fresh ephemeral key: GCM nonces
    (the chunk indices) are never reused under one key, even when a retry resends the update.
    """

    def __init__(self, prepared: PreparedUpload) -> None:
        self._prepared = prepared
        self._encryptor: ChunkEncryptor | None = None
        if prepared.encrypted:
            self._encryptor = prepared.new_encryptor()
        self._messages: Iterator[coordinator_pb2.UploadMessage] | None = None
        self._started = False

    def header(self) -> coordinator_pb2.UploadHeader:
        """The header of this attempt (carries this attempt's ephemeral public key)."""
        p = self._prepared
        update = p.update
        return coordinator_pb2.UploadHeader(
            round=p.round_id,
            client_public_key=self._encryptor.client_public_key if self._encryptor else b"",
            num_samples=update.num_samples,
            module_samples=update.module_samples,
            metrics=common_pb2.Metrics(values=update.metrics),
            payload_size=len(update.payload),
            payload_sha256=p.payload_sha256,
            total_chunks=p.total_chunks,
            encrypted=self._encryptor is not None,
            upload_id=p.upload_id,
        )

    def _start(self) -> None:
        if self._started:
            raise RuntimeError("an UploadAttempt is consumed once; start a new one to resend")
        self._started = True

    def __iter__(self) -> UploadAttempt:
        return self

    def __next__(self) -> coordinator_pb2.UploadMessage:
        if self._messages is None:
            self._start()
            self._messages = self._proto_messages()
        return next(self._messages)

    def _proto_messages(self) -> Iterator[coordinator_pb2.UploadMessage]:
        p = self._prepared
        yield coordinator_pb2.UploadMessage(header=self.header())
        for index, plain in p.chunk_views():
            data = (
                self._encryptor.encrypt_chunk(index, p.total_chunks, plain)
                if self._encryptor
                else plain.tobytes()
            )
            chunk = common_pb2.TensorChunk(
                index=index,
                total=p.total_chunks,
                data=data,
                payload_sha256=p.payload_sha256,
                payload_size=len(p.update.payload),
                round=p.round_id,
            )
            yield coordinator_pb2.UploadMessage(chunk=chunk)

    def wire_frames(self) -> Iterator[bytes]:
        """Serialized ``UploadMessage``s: the header, then one frame per chunk, each made
        when gRPC asks for it (one copy of the data per chunk after encryption)."""
        self._start()
        return self._frames()

    def _frames(self) -> Iterator[bytes]:
        p = self._prepared
        total, size = p.total_chunks, len(p.update.payload)
        yield coordinator_pb2.UploadMessage(header=self.header()).SerializeToString()
        overhead = TAG_SIZE if self._encryptor else 0
        scratch = bytearray()
        for index, plain in p.chunk_views():
            data_len = plain.nbytes + overhead
            prefix = upload_chunk_prefix(index, total, data_len, p.payload_sha256, size, p.round_id)
            if self._encryptor is None:
                yield b"".join((prefix, plain))
                continue
            frame_len = len(prefix) + data_len
            if len(scratch) < frame_len:
                scratch = bytearray(frame_len)
            frame = memoryview(scratch)[:frame_len]
            frame[: len(prefix)] = prefix
            self._encryptor.encrypt_chunk_into(index, total, plain, frame[len(prefix) :])
            yield bytes(frame)


@dataclass(frozen=True)
class PreparedUpload:
    """Everything one upload sends, kept across retries (same update, header and upload_id);
    the chunk messages themselves are made per attempt, see :class:`UploadAttempt`."""

    upload_id: str
    server_public_key: bytes
    encrypted: bool
    wire_bytes: int
    update: LocalUpdate
    round_id: int
    client_id: str
    chunk_size: int
    total_chunks: int
    payload_sha256: bytes
    encryptor_factory: EncryptorFactory | None = None
    # the encryptor prepare_upload made (to fail early on a bad key), for the first attempt
    _unused: list[ChunkEncryptor] = field(default_factory=list, repr=False, compare=False)

    def new_encryptor(self) -> ChunkEncryptor:
        """An encryptor with a fresh ephemeral key (never one a previous attempt used)."""
        if self._unused:
            return self._unused.pop()
        assert self.encryptor_factory is not None
        return self.encryptor_factory(self.server_public_key, self.client_id, self.round_id)

    @property
    def messages(self) -> UploadAttempt:
        """A new attempt: header then chunks, produced lazily (pass it to transport.upload)."""
        return UploadAttempt(self)

    def chunk_views(self) -> Iterator[tuple[int, memoryview]]:
        """(index, plaintext view) of every chunk; views of the update, no copies."""
        view = memoryview(self.update.payload).cast("B")
        if not view.nbytes:
            yield 0, view
            return
        cs = self.chunk_size
        for index in range(self.total_chunks):
            yield index, view[index * cs : (index + 1) * cs]


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
    encryptor is available.

    An encrypted upload needs no whole-payload SHA-256: every chunk is AES-GCM-authenticated
    with client, round, index and chunk count bound as associated data, so the server gets
    exactly the bytes encrypted or rejects the upload (it hashes what it received for its
    records). A known digest is still sent, and checked. A plaintext upload always carries it.
    """
    if type(chunk_size) is not int or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    size = len(update.payload)
    encrypted = bool(server_public_key) and encryptor_factory is not None
    if server_public_key and not encrypted:
        log.warning("upload encryption module not available: sending round %d in clear", round_id)
    unused: list[ChunkEncryptor] = []
    if encrypted:
        assert encryptor_factory is not None
        # a bad key or client id fails here, not later inside gRPC's request thread
        unused.append(encryptor_factory(server_public_key, client_id, round_id))
    digest = update.payload_sha256
    if not digest and not encrypted:
        digest = hashlib.sha256(update.payload).digest()
    total = max(1, -(-size // chunk_size))
    return PreparedUpload(
        upload_id=upload_id,
        server_public_key=server_public_key,
        encrypted=encrypted,
        wire_bytes=size + (TAG_SIZE * total if encrypted else 0),
        update=update,
        round_id=round_id,
        client_id=client_id,
        chunk_size=chunk_size,
        total_chunks=total,
        payload_sha256=digest,
        encryptor_factory=encryptor_factory if encrypted else None,
        _unused=unused,
    )
