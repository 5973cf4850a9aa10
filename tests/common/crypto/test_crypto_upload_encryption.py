"""Encrypted upload: round trip, and rejection of tampered/reordered/replayed/cross-round chunks."""

from __future__ import annotations

import os

import pytest
from crossfed.common.crypto.upload_encryption import (
    TAG_SIZE,
    UploadDecryptionError,
    UploadDecryptor,
    UploadEncryptionError,
    UploadEncryptor,
    UploadKeyPair,
    encrypted_size,
)
from hypothesis import given, settings
from hypothesis import strategies as st

SERVER = UploadKeyPair.generate()


def _upload(
    client: str = "c1", rnd: int = 3, chunks: int = 4
) -> tuple[bytes, list[bytes], list[bytes]]:
    enc = UploadEncryptor(SERVER.public_key, client, rnd)
    plain = [os.urandom(100 + i) for i in range(chunks)]
    cipher = [enc.encrypt_chunk(i, chunks, p) for i, p in enumerate(plain)]
    return enc.client_public_key, plain, cipher


@settings(max_examples=25, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=300), min_size=1, max_size=6),
    client=st.text(min_size=1, max_size=20),
    rnd=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_round_trip_any_order(chunks: list[bytes], client: str, rnd: int) -> None:
    enc = UploadEncryptor(SERVER.public_key, client, rnd)
    total = len(chunks)
    cipher = [enc.encrypt_chunk(i, total, c) for i, c in enumerate(chunks)]
    assert all(len(c) == encrypted_size(len(p)) for c, p in zip(cipher, chunks, strict=True))
    dec = UploadDecryptor(SERVER, enc.client_public_key, client, rnd)
    for i in reversed(range(total)):  # arrival order is free; index binding is not
        assert dec.decrypt_chunk(i, total, cipher[i]) == chunks[i]
    assert dec.complete and dec.missing() == []


def test_ciphertext_hides_plaintext_and_keys_differ_per_upload() -> None:
    enc1 = UploadEncryptor(SERVER.public_key, "c1", 1)
    enc2 = UploadEncryptor(SERVER.public_key, "c1", 1)
    data = b"A" * 64
    c1, c2 = enc1.encrypt_chunk(0, 1, data), enc2.encrypt_chunk(0, 1, data)
    assert data not in c1 and c1 != c2
    assert enc1.client_public_key != enc2.client_public_key


def test_tampered_chunk_is_rejected_then_genuine_accepted() -> None:
    pub, plain, cipher = _upload()
    dec = UploadDecryptor(SERVER, pub, "c1", 3)
    for pos in (0, len(cipher[1]) // 2, len(cipher[1]) - 1):  # body and tag
        bad = bytearray(cipher[1])
        bad[pos] ^= 0x01
        with pytest.raises(UploadDecryptionError, match="authentication failed"):
            dec.decrypt_chunk(1, 4, bytes(bad))
    assert dec.decrypt_chunk(1, 4, cipher[1]) == plain[1]
    with pytest.raises(UploadDecryptionError, match="shorter than a tag"):
        dec.decrypt_chunk(2, 4, cipher[2][: TAG_SIZE - 1])


def test_reordered_chunk_is_rejected() -> None:
    pub, _, cipher = _upload()
    dec = UploadDecryptor(SERVER, pub, "c1", 3)
    with pytest.raises(UploadDecryptionError, match="authentication failed"):
        dec.decrypt_chunk(0, 4, cipher[1])


def test_truncated_total_is_rejected() -> None:
    pub, _, cipher = _upload()
    dec = UploadDecryptor(SERVER, pub, "c1", 3)
    with pytest.raises(UploadDecryptionError, match="authentication failed"):
        dec.decrypt_chunk(0, 3, cipher[0])  # claim the upload had only 3 chunks


def test_replayed_chunk_within_upload_is_rejected() -> None:
    pub, _, cipher = _upload()
    dec = UploadDecryptor(SERVER, pub, "c1", 3)
    dec.decrypt_chunk(0, 4, cipher[0])
    with pytest.raises(UploadDecryptionError, match="duplicate chunk index"):
        dec.decrypt_chunk(0, 4, cipher[0])
    with pytest.raises(UploadDecryptionError, match="total differs"):
        dec.decrypt_chunk(1, 5, cipher[1])
    assert not dec.complete and dec.missing() == [1, 2, 3]


def test_cross_round_and_cross_client_replay_fail() -> None:
    pub, _, cipher = _upload(rnd=3)
    with pytest.raises(UploadDecryptionError, match="round 4"):
        UploadDecryptor(SERVER, pub, "c1", 4).decrypt_chunk(0, 4, cipher[0])
    with pytest.raises(UploadDecryptionError, match="authentication failed"):
        UploadDecryptor(SERVER, pub, "c2", 3).decrypt_chunk(0, 4, cipher[0])
    other_server = UploadKeyPair.generate()
    with pytest.raises(UploadDecryptionError, match="authentication failed"):
        UploadDecryptor(other_server, pub, "c1", 3).decrypt_chunk(0, 4, cipher[0])


def test_encryptor_never_reuses_a_nonce_and_validates_input() -> None:
    enc = UploadEncryptor(SERVER.public_key, "c1", 0)
    enc.encrypt_chunk(0, 2, b"x")
    with pytest.raises(UploadEncryptionError, match="nonces must never repeat"):
        enc.encrypt_chunk(0, 2, b"y")
    with pytest.raises(UploadEncryptionError, match="total changed"):
        enc.encrypt_chunk(1, 3, b"y")
    with pytest.raises(UploadEncryptionError, match="outside"):
        enc.encrypt_chunk(2, 2, b"y")
    with pytest.raises(UploadEncryptionError, match="32 raw X25519 bytes"):
        UploadEncryptor(b"short", "c1", 0)
    with pytest.raises(UploadEncryptionError, match="client_id"):
        UploadEncryptor(SERVER.public_key, "", 0)
    with pytest.raises(UploadEncryptionError, match="invalid public key"):
        UploadEncryptor(bytes(32), "c1", 0)  # all-zero (low-order) point
    with pytest.raises(UploadDecryptionError, match="32 raw X25519 bytes"):
        UploadDecryptor(SERVER, b"", "c1", 0)


def test_key_pair_persistence_and_redacted_repr() -> None:
    restored = UploadKeyPair.from_private_bytes(SERVER.private_bytes())
    assert restored.public_key == SERVER.public_key
    assert SERVER.private_bytes().hex() not in repr(SERVER)
    assert "redacted" in repr(SERVER)
    pub, plain, cipher = _upload()
    assert UploadDecryptor(restored, pub, "c1", 3).decrypt_chunk(2, 4, cipher[2]) == plain[2]


def test_decrypt_into_preallocated_payload_buffer() -> None:
    pub, plain, cipher = _upload(chunks=3)
    payload = bytearray(sum(len(p) for p in plain))
    view = memoryview(payload)
    dec = UploadDecryptor(SERVER, pub, "c1", 3)
    offset = 0
    for i, c in enumerate(cipher):
        offset += dec.decrypt_chunk_into(i, 3, c, view[offset : offset + len(c) - TAG_SIZE])
    assert bytes(payload) == b"".join(plain) and dec.complete
    dec2 = UploadDecryptor(SERVER, pub, "c1", 3)
    bad = bytearray(cipher[0])
    bad[-1] ^= 1
    with pytest.raises(UploadDecryptionError, match="authentication failed"):
        dec2.decrypt_chunk_into(0, 3, bytes(bad), bytearray(len(plain[0])))
    with pytest.raises(UploadDecryptionError, match="output buffer"):
        dec2.decrypt_chunk_into(0, 3, cipher[0], bytearray(1))
    assert dec2.received == 0 and dec2.total is None


def test_encrypt_into_matches_encrypt_and_shares_the_nonce_guard() -> None:
    plain = [os.urandom(1000), os.urandom(17)]
    enc = UploadEncryptor(SERVER.public_key, "c1", 9)
    frame = bytearray(5 + encrypted_size(len(plain[0])))  # e.g. behind 5 bytes of framing
    written = enc.encrypt_chunk_into(0, 2, memoryview(plain[0]), memoryview(frame)[5:])
    assert written == encrypted_size(len(plain[0]))
    second = enc.encrypt_chunk(1, 2, memoryview(plain[1]))  # views are accepted too
    dec = UploadDecryptor(SERVER, enc.client_public_key, "c1", 9)
    assert dec.decrypt_chunk(0, 2, memoryview(frame)[5:]) == plain[0]
    assert dec.decrypt_chunk(1, 2, second) == plain[1]
    with pytest.raises(UploadEncryptionError, match="nonces must never repeat"):
        enc.encrypt_chunk_into(0, 2, plain[0], memoryview(frame)[5:])
    with pytest.raises(UploadEncryptionError, match="nonces must never repeat"):
        enc.encrypt_chunk(1, 2, plain[1])
    fresh = UploadEncryptor(SERVER.public_key, "c1", 9)
    with pytest.raises(UploadEncryptionError, match="output buffer"):
        fresh.encrypt_chunk_into(0, 2, plain[0], bytearray(len(plain[0])))  # no room for tag
    fresh.encrypt_chunk_into(0, 2, plain[0], bytearray(encrypted_size(len(plain[0]))))  # unused


def test_check_chunk_rejects_bad_framing_before_any_decryption() -> None:
    pub, plain, cipher = _upload()
    dec = UploadDecryptor(SERVER, pub, "c1", 3)
    dec.check_chunk(0, 4, memoryview(cipher[0]))  # fine: nothing recorded yet
    assert dec.received == 0
    assert dec.decrypt_chunk(0, 4, memoryview(cipher[0])) == plain[0]
    with pytest.raises(UploadDecryptionError, match="duplicate chunk index"):
        dec.check_chunk(0, 4, cipher[0])
    with pytest.raises(UploadDecryptionError, match="total differs"):
        dec.check_chunk(1, 5, cipher[1])
    with pytest.raises(UploadDecryptionError, match="shorter than a tag"):
        dec.check_chunk(1, 4, cipher[1][:3])
    with pytest.raises(UploadDecryptionError, match="index outside"):
        dec.check_chunk(4, 4, cipher[1])
