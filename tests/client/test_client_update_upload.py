"""update_upload: the lazily made upload stream, as protobuf messages and as wire frames, is
the same upload; each attempt has its own encryptor; the digest rules for encrypted uploads."""

from __future__ import annotations

import hashlib
import os

import pytest
from crossfed.client.update_upload import (
    LocalUpdate,
    default_encryptor_factory,
    prepare_upload,
)
from crossfed.common.crypto.upload_encryption import (
    UploadDecryptor,
    UploadEncryptionError,
    UploadEncryptor,
    UploadKeyPair,
)
from crossfed.v1 import coordinator_pb2

SERVER = UploadKeyPair.generate()
PAYLOAD = os.urandom(10_000)


def _decrypted(messages: list[coordinator_pb2.UploadMessage], client: str, rnd: int) -> bytes:
    header = messages[0].header
    dec = UploadDecryptor(SERVER, bytes(header.client_public_key), client, rnd)
    return b"".join(
        dec.decrypt_chunk(m.chunk.index, m.chunk.total, bytes(m.chunk.data)) for m in messages[1:]
    )


def test_wire_frames_are_the_protobuf_messages_and_decrypt_to_the_payload() -> None:
    prepared = prepare_upload(
        LocalUpdate(PAYLOAD, 7, {"mapper": 3}, {"loss": 0.5}),
        4,
        "alice",
        "u-1",
        3000,
        SERVER.public_key,
        default_encryptor_factory(),
    )
    frames = [coordinator_pb2.UploadMessage.FromString(f) for f in prepared.messages.wire_frames()]
    header = frames[0].header
    assert (header.round, header.num_samples, header.total_chunks) == (4, 7, 4)
    assert dict(header.module_samples) == {"mapper": 3} and header.upload_id == "u-1"
    assert header.encrypted and header.payload_sha256 == b""  # every chunk is authenticated
    assert [f.chunk.index for f in frames[1:]] == [0, 1, 2, 3]
    assert all(f.chunk.round == 4 and f.chunk.payload_size == len(PAYLOAD) for f in frames[1:])
    assert _decrypted(frames, "alice", 4) == PAYLOAD
    as_protobuf = list(prepared.messages)  # the other rendering of a fresh attempt
    assert [m.WhichOneof("kind") for m in as_protobuf] == ["header"] + ["chunk"] * 4
    assert _decrypted(as_protobuf, "alice", 4) == PAYLOAD
    assert prepared.wire_bytes == sum(len(f.chunk.data) for f in frames[1:])


def test_every_attempt_encrypts_under_its_own_ephemeral_key() -> None:
    made: list[UploadEncryptor] = []

    def factory(key: bytes, client: str, rnd: int) -> UploadEncryptor:
        made.append(UploadEncryptor(key, client, rnd))
        return made[-1]

    prepared = prepare_upload(
        LocalUpdate(PAYLOAD, 1), 2, "bob", "u-2", 4096, SERVER.public_key, factory
    )
    assert len(made) == 1  # a bad key would have failed here, before any gRPC call
    first = prepared.messages
    second = prepared.messages
    keys = {
        coordinator_pb2.UploadMessage.FromString(next(a.wire_frames())).header.client_public_key
        for a in (first, second)
    }
    assert len(made) == 2 and len(keys) == 2  # the first attempt used the early encryptor
    with pytest.raises(RuntimeError, match="consumed once"):
        list(first)
    with pytest.raises(UploadEncryptionError):
        prepare_upload(LocalUpdate(PAYLOAD, 1), 2, "bob", "u-2", 4096, b"bad", factory)


def test_chunks_are_made_when_asked_for() -> None:
    calls: list[int] = []

    class Counting(UploadEncryptor):
        def encrypt_chunk_into(self, index, total, plaintext, out):  # type: ignore[no-untyped-def]
            calls.append(index)
            return super().encrypt_chunk_into(index, total, plaintext, out)

    prepared = prepare_upload(
        LocalUpdate(PAYLOAD, 1), 1, "c", "u", 1000, SERVER.public_key, Counting
    )
    frames = prepared.messages.wire_frames()
    next(frames), next(frames)
    assert calls == [0]  # header, then only the first chunk so far
    rest = list(frames)
    assert len(rest) == 9 and calls == list(range(10))


def test_digest_rules() -> None:
    known = hashlib.sha256(PAYLOAD).digest()
    encrypted_known = prepare_upload(
        LocalUpdate(PAYLOAD, 1, payload_sha256=known),
        1,
        "c",
        "u",
        4096,
        SERVER.public_key,
        default_encryptor_factory(),
    )
    assert encrypted_known.messages.header().payload_sha256 == known  # sent, and checked
    clear = prepare_upload(LocalUpdate(PAYLOAD, 1), 1, "c", "u", 4096, b"", None)
    frames = [coordinator_pb2.UploadMessage.FromString(f) for f in clear.messages.wire_frames()]
    assert frames[0].header.payload_sha256 == known and not frames[0].header.encrypted
    assert all(f.chunk.payload_sha256 == known for f in frames[1:])
    assert b"".join(f.chunk.data for f in frames[1:]) == PAYLOAD
    assert clear.wire_bytes == len(PAYLOAD)


def test_empty_update_is_one_empty_chunk() -> None:
    prepared = prepare_upload(
        LocalUpdate(b"", 1), 1, "c", "u", 4096, SERVER.public_key, default_encryptor_factory()
    )
    frames = [coordinator_pb2.UploadMessage.FromString(f) for f in prepared.messages.wire_frames()]
    assert frames[0].header.total_chunks == 1 and len(frames) == 2
    assert _decrypted(frames, "c", 1) == b""
