"""Every chunk of an encrypted upload is AES-GCM-authenticated by the receiver, including the
single empty chunk of a zero-byte payload (which has no bytes to decrypt, only a tag); the
upload record's digest covers the tags, or the plaintext when declared or asked for."""

from __future__ import annotations

import hashlib

import pytest
from crossfed.common.crypto.upload_encryption import UploadEncryptor, UploadKeyPair
from crossfed.common.wire.chunk_stream import ChunkFrame
from crossfed.server.errors import InvalidUpdateError
from crossfed.server.upload_receiver import AEAD_TAGS_PREFIX, UploadPolicy, receive_payload
from crossfed.v1 import coordinator_pb2


def _empty_upload(key: UploadKeyPair, tag: bytes | None) -> bytes:
    """Receive a zero-byte encrypted upload whose one chunk is ``tag`` (None: the real one)."""
    enc = UploadEncryptor(key.public_key, "alice", 3)
    data = enc.encrypt_chunk(0, 1, b"") if tag is None else tag
    header = coordinator_pb2.UploadHeader(
        round=3,
        client_public_key=enc.client_public_key,
        payload_size=0,
        total_chunks=1,
        encrypted=True,
    )
    policy = UploadPolicy(max_payload_bytes=1 << 20, allow_unencrypted=False, upload_key=key)
    chunk = ChunkFrame(0, 1, data, b"", 0, 3)
    return receive_payload(header, iter([chunk]), policy, "alice").view.tobytes()


def test_an_authentic_empty_chunk_is_accepted() -> None:
    assert _empty_upload(UploadKeyPair.generate(), None) == b""


def test_a_forged_tag_on_an_empty_chunk_is_rejected() -> None:
    with pytest.raises(InvalidUpdateError, match="authentication failed"):
        _empty_upload(UploadKeyPair.generate(), b"\x00" * 16)


def _receive(
    payload: bytes, hash_plaintext: bool, chunk: int = 1000, declare: bool = False
) -> tuple[str, list[bytes]]:
    """Receive an encrypted upload; return the record digest and the chunks' tags."""
    key = UploadKeyPair.generate()
    enc = UploadEncryptor(key.public_key, "alice", 3)
    pieces = [payload[i : i + chunk] for i in range(0, len(payload), chunk)]
    sealed = [enc.encrypt_chunk(i, len(pieces), p) for i, p in enumerate(pieces)]
    digest = hashlib.sha256(payload).digest() if declare else b""
    header = coordinator_pb2.UploadHeader(
        round=3,
        client_public_key=enc.client_public_key,
        payload_size=len(payload),
        total_chunks=len(pieces),
        encrypted=True,
        payload_sha256=digest,
    )
    policy = UploadPolicy(
        max_payload_bytes=1 << 20,
        allow_unencrypted=False,
        upload_key=key,
        hash_encrypted_uploads=hash_plaintext,
    )
    # out of order within the reorder window: the tags are still taken in index order
    order = [1, 0, *range(2, len(sealed))]
    frames = [ChunkFrame(i, len(sealed), sealed[i], digest, len(payload), 3) for i in order]
    got = receive_payload(header, iter(frames), policy, "alice")
    assert got.view.tobytes() == payload
    return got.digest, [s[-16:] for s in sealed]


def test_record_digest_is_the_tags_digest_unless_the_policy_hashes_the_plaintext() -> None:
    payload = bytes(range(256)) * 20
    digest, tags = _receive(payload, hash_plaintext=False)
    assert digest == AEAD_TAGS_PREFIX + hashlib.sha256(b"".join(tags)).hexdigest()
    digest, _ = _receive(payload, hash_plaintext=True)
    assert digest == hashlib.sha256(payload).hexdigest()
    # a declared digest is checked and recorded whatever the policy says
    digest, _ = _receive(payload, hash_plaintext=False, declare=True)
    assert digest == hashlib.sha256(payload).hexdigest()
