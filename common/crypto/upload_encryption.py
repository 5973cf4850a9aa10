"""Encrypted model uploads: X25519 key agreement + HKDF-SHA256 -> AES-256-GCM per chunk.

Per upload the client makes an ephemeral X25519 key pair and agrees a secret with the
server's announced key; HKDF (salt = both public keys, info = protocol, client id and
round) yields a fresh AES-256-GCM key, so one key never encrypts two uploads. The chunk
index is the GCM nonce counter and (client id, round, index, total) are associated data:
a chunk that is tampered with, moved to another index, truncated into another total,
sent by another client or replayed into another round fails authentication.

Wire format of one encrypted chunk: ``ciphertext || 16-byte GCM tag`` (no header; the
index and total travel in the TensorChunk message and are authenticated here).
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PROTOCOL_LABEL = b"crossfed-upload-v1"
PUBLIC_KEY_SIZE = 32
TAG_SIZE = 16
MAX_CHUNKS = 2**32 - 1


class UploadEncryptionError(Exception):
    """The encryption side was used wrongly (bad key, repeated chunk index, bad total)."""


class UploadDecryptionError(Exception):
    """A chunk was rejected: tampered, reordered, replayed, cross-round or malformed."""


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _load_public(data: bytes, what: str, error: type[Exception]) -> X25519PublicKey:
    if not isinstance(data, bytes | bytearray) or len(data) != PUBLIC_KEY_SIZE:
        size = len(data) if isinstance(data, bytes | bytearray) else type(data).__name__
        raise error(f"{what} must be {PUBLIC_KEY_SIZE} raw X25519 bytes, got {size}")
    return X25519PublicKey.from_public_bytes(bytes(data))


def _check_client_round(client_id: str, round_id: int, error: type[Exception]) -> bytes:
    if not client_id:
        raise error("client_id must not be empty")
    if not 0 <= round_id < 2**64:
        raise error(f"round_id must be in [0, 2^64), got {round_id}")
    return client_id.encode("utf-8")


def _derive_key(
    shared: bytes, client_pub: bytes, server_pub: bytes, client_id: bytes, round_id: int
) -> bytes:
    """HKDF-SHA256 of the X25519 secret, bound to both keys, the client and the round."""
    info = PROTOCOL_LABEL + struct.pack(">I", len(client_id)) + client_id
    info += struct.pack(">Q", round_id)
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=client_pub + server_pub, info=info
    ).derive(shared)


def _aad(client_id: bytes, round_id: int, index: int, total: int) -> bytes:
    return (
        PROTOCOL_LABEL
        + struct.pack(">I", len(client_id))
        + client_id
        + struct.pack(">QII", round_id, index, total)
    )


def _nonce(index: int) -> bytes:
    return b"\x00\x00\x00\x00" + struct.pack(">Q", index)


def _exchange(private: X25519PrivateKey, peer: X25519PublicKey, error: type[Exception]) -> bytes:
    try:
        return private.exchange(peer)
    except ValueError as exc:  # low-order peer point -> all-zero secret
        raise error(f"X25519 key agreement failed (invalid public key): {exc}") from None


@dataclass
class UploadKeyPair:
    """The server's X25519 key pair for uploads (one per run or per round).

    ``public_key`` (32 bytes) is announced in the round info; the private key never
    leaves the server process. ``repr`` shows the public key only.
    """

    private_key: X25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls) -> UploadKeyPair:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> UploadKeyPair:
        """Restore a persisted key pair (32 raw private bytes)."""
        if len(data) != 32:
            raise UploadDecryptionError(f"X25519 private key must be 32 bytes, got {len(data)}")
        return cls(X25519PrivateKey.from_private_bytes(data))

    def private_bytes(self) -> bytes:
        """32 raw private bytes, for the server's own persisted state (keep it 0600)."""
        return self.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @property
    def public_key(self) -> bytes:
        return _raw_public(self.private_key.public_key())

    def __repr__(self) -> str:
        return f"UploadKeyPair(public_key={self.public_key.hex()}, private_key=<redacted>)"


class UploadEncryptor:
    """Client side of one upload: encrypts each chunk index exactly once.

    A retried upload must use a new UploadEncryptor (new ephemeral key), never
    re-encrypt an index with this one: the index is the GCM nonce.
    """

    def __init__(self, server_public_key: bytes, client_id: str, round_id: int) -> None:
        server_pub = _load_public(server_public_key, "server public key", UploadEncryptionError)
        self._client_id = _check_client_round(client_id, round_id, UploadEncryptionError)
        self._round_id = round_id
        ephemeral = X25519PrivateKey.generate()
        self._client_public = _raw_public(ephemeral.public_key())
        shared = _exchange(ephemeral, server_pub, UploadEncryptionError)
        key = _derive_key(
            shared, self._client_public, bytes(server_public_key), self._client_id, round_id
        )
        self._aead = AESGCM(key)
        self._used: set[int] = set()
        self._total: int | None = None

    @property
    def client_public_key(self) -> bytes:
        """The ephemeral public key to send in the upload header (32 bytes)."""
        return self._client_public

    def _claim(self, index: int, total: int) -> None:
        """Check framing and mark ``index`` used: each nonce is handed out at most once."""
        if not 0 < total <= MAX_CHUNKS:
            raise UploadEncryptionError(f"total chunks must be in [1, {MAX_CHUNKS}], got {total}")
        if self._total is not None and total != self._total:
            raise UploadEncryptionError(
                f"total changed within one upload ({self._total} -> {total})"
            )
        if not 0 <= index < total:
            raise UploadEncryptionError(f"chunk index {index} outside [0, {total})")
        if index in self._used:
            raise UploadEncryptionError(
                f"chunk {index} already encrypted with this key; nonces must never repeat "
                "(start a new UploadEncryptor for a retried upload)"
            )
        self._total = total
        self._used.add(index)

    def encrypt_chunk(self, index: int, total: int, plaintext: bytes | memoryview) -> bytes:
        """Encrypt chunk ``index`` of ``total``; returns ciphertext || tag."""
        self._claim(index, total)
        return self._aead.encrypt(
            _nonce(index), plaintext, _aad(self._client_id, self._round_id, index, total)
        )

    def encrypt_chunk_into(
        self, index: int, total: int, plaintext: bytes | memoryview, out: bytearray | memoryview
    ) -> int:
        """Like encrypt_chunk, but writes ciphertext || tag into ``out`` (exactly
        ``encrypted_size(len(plaintext))`` bytes, e.g. behind a message's framing) and returns
        that length: no per-chunk allocation, no slice copy of the plaintext."""
        size = encrypted_size(memoryview(plaintext).nbytes)
        if memoryview(out).nbytes != size:
            raise UploadEncryptionError(f"output buffer is {len(out)} bytes, need {size}")
        self._claim(index, total)
        nonce, aad = _nonce(index), _aad(self._client_id, self._round_id, index, total)
        encrypt_into = getattr(self._aead, "encrypt_into", None)
        if encrypt_into is None:  # a cryptography release without AEAD encrypt_into
            memoryview(out)[:] = self._aead.encrypt(nonce, bytes(plaintext), aad)
            return size
        written: int = encrypt_into(nonce, plaintext, aad, out)
        return written


class UploadDecryptor:
    """Server side of one upload from one client in one round.

    Built from the server's private key and the client's announced ephemeral public
    key, with ``client_id`` taken from the *authenticated* identity (not the message).
    Accepts chunks in any arrival order, each index at most once, with one constant total.
    """

    def __init__(
        self,
        server_private_key: X25519PrivateKey | UploadKeyPair,
        client_public_key: bytes,
        client_id: str,
        round_id: int,
    ) -> None:
        private = (
            server_private_key.private_key
            if isinstance(server_private_key, UploadKeyPair)
            else server_private_key
        )
        client_pub = _load_public(client_public_key, "client public key", UploadDecryptionError)
        self._client_id = _check_client_round(client_id, round_id, UploadDecryptionError)
        self._client_label = client_id
        self._round_id = round_id
        server_pub = _raw_public(private.public_key())
        if hmac.compare_digest(bytes(client_public_key), server_pub):
            raise UploadDecryptionError("client public key equals the server key; refusing")
        shared = _exchange(private, client_pub, UploadDecryptionError)
        key = _derive_key(shared, bytes(client_public_key), server_pub, self._client_id, round_id)
        self._aead = AESGCM(key)
        self._received: set[int] = set()
        self._total: int | None = None

    @property
    def total(self) -> int | None:
        """The chunk count fixed by the first accepted chunk (None before it)."""
        return self._total

    @property
    def received(self) -> int:
        return len(self._received)

    @property
    def complete(self) -> bool:
        """True once every index in [0, total) was accepted."""
        return self._total is not None and len(self._received) == self._total

    def missing(self) -> list[int]:
        """Indices not yet accepted (empty before the first chunk: total unknown)."""
        if self._total is None:
            return []
        return [i for i in range(self._total) if i not in self._received]

    def _check(
        self, index: int, total: int, ciphertext: bytes | memoryview
    ) -> tuple[str, bytes, bytes]:
        """Validate framing before touching the cipher; returns (where, nonce, aad)."""
        where = f"chunk {index}/{total} from client {self._client_label!r} round {self._round_id}"
        if not 0 < total <= MAX_CHUNKS:
            raise UploadDecryptionError(f"{where}: total chunks must be in [1, {MAX_CHUNKS}]")
        if not 0 <= index < total:
            raise UploadDecryptionError(f"{where}: index outside [0, {total})")
        if self._total is not None and total != self._total:
            raise UploadDecryptionError(
                f"{where}: total differs from the {self._total} announced by earlier chunks"
            )
        if index in self._received:
            raise UploadDecryptionError(f"{where}: duplicate chunk index (replayed chunk)")
        if len(ciphertext) < TAG_SIZE:
            raise UploadDecryptionError(f"{where}: {len(ciphertext)} bytes is shorter than a tag")
        return where, _nonce(index), _aad(self._client_id, self._round_id, index, total)

    def check_chunk(self, index: int, total: int, ciphertext: bytes | memoryview) -> None:
        """Raise UploadDecryptionError now if the chunk's framing (index, total, repeat,
        length) is already wrong; authentication still happens in decrypt_chunk[_into]."""
        self._check(index, total, ciphertext)

    def _failed(self, where: str) -> UploadDecryptionError:
        return UploadDecryptionError(
            f"{where}: authentication failed (tampered, reordered, truncated, or "
            "encrypted for another client, round or key)"
        )

    def decrypt_chunk(self, index: int, total: int, ciphertext: bytes | memoryview) -> bytes:
        """Authenticate and decrypt chunk ``index`` of ``total``; raise UploadDecryptionError."""
        where, nonce, aad = self._check(index, total, ciphertext)
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise self._failed(where) from None
        self._total = total
        self._received.add(index)
        return plaintext

    def decrypt_chunk_into(
        self, index: int, total: int, ciphertext: bytes | memoryview, out: bytearray | memoryview
    ) -> int:
        """Like decrypt_chunk, but writes the plaintext into ``out`` (e.g. a slice of a
        preallocated payload buffer) and returns its length; avoids one allocation per
        chunk, which dominates the cost at ~1 MiB chunks. ``out`` must be exactly
        ``len(ciphertext) - TAG_SIZE`` bytes; on failure its content is unspecified."""
        where, nonce, aad = self._check(index, total, ciphertext)
        size = len(ciphertext) - TAG_SIZE
        if len(out) != size:
            raise UploadDecryptionError(f"{where}: output buffer is {len(out)} bytes, need {size}")
        try:
            self._aead.decrypt_into(nonce, ciphertext, aad, out)
        except InvalidTag:
            raise self._failed(where) from None
        self._total = total
        self._received.add(index)
        return size


def encrypted_size(plaintext_size: int) -> int:
    """Bytes on the wire for one chunk of ``plaintext_size`` bytes."""
    return plaintext_size + TAG_SIZE
