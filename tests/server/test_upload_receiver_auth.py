"""Every chunk of an encrypted upload is AES-GCM-authenticated by the receiver, including the
single empty chunk of a zero-byte payload (which has no bytes to decrypt, only a tag)."""

from __future__ import annotations

import pytest
from crossfed.common.crypto.upload_encryption import UploadEncryptor, UploadKeyPair
from crossfed.common.wire.chunk_frames import ChunkFrame
from crossfed.server.errors import InvalidUpdateError
from crossfed.server.upload_receiver import UploadPolicy, receive_payload
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
