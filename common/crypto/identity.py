"""Client identities: one-time enrollment tokens, per-client secrets, admin credentials and
the per-RPC HMAC-SHA256 request signature (transport-free; gRPC glue is in rpc_auth.py).

Signature (sent as gRPC metadata, see HEADER_*)::

    HMAC-SHA256(secret, "crossfed-rpc-v2\\n" method "\\n" client_id "\\n" timestamp_ms "\\n"
                nonce "\\n" body_sha256)

where body_sha256 is the hex SHA-256 of the serialized request (of a client stream: its first
message, e.g. the upload header, which binds the rest). The server accepts it when the
timestamp is within ``max_skew_s`` of its clock, the nonce was not seen before from this
client (bounded replay cache, journaled to disk so a restart does not forget it), the
credential exists, is not revoked or expired, and the HMAC matches; the transport then checks
the body it received against body_sha256 (rpc_auth.py). Secrets never appear in
repr/str/logs.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import json
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Protocol

from crossfed.common.crypto.nonce_journal import JournalEntry, NonceJournal
from crossfed.common.crypto.secure_files import (
    SecureFileError,
    check_secret_permissions,
    write_secret_file,
)

SIGNATURE_VERSION = b"crossfed-rpc-v2"
HEADER_CLIENT_ID = "x-crossfed-client-id"
HEADER_TIMESTAMP = "x-crossfed-timestamp-ms"
HEADER_NONCE = "x-crossfed-nonce"
HEADER_BODY_SHA256 = "x-crossfed-body-sha256"
HEADER_SIGNATURE = "x-crossfed-signature"
TOKEN_PREFIX = "cfe_"
SECRET_BYTES = 32
NONCE_BYTES = 16
DEFAULT_MAX_SKEW_S = 120.0
DEFAULT_REPLAY_CACHE_ENTRIES = 100_000
_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_NONCE_RE = re.compile(r"^[0-9a-f]{32}$")
_SIGNATURE_RE = re.compile(r"^[0-9a-f]{64}$")


class IdentityError(Exception):
    """Base class of identity problems (all carry a human-readable message)."""


class EnrollmentError(IdentityError):
    """An enrollment token was unknown, used, expired, or the client id is unusable."""


class AuthenticationError(IdentityError):
    """A request's credential is missing, malformed, forged, expired, revoked or replayed."""


class CredentialFileError(IdentityError):
    """A saved client credential file is missing, unsafe or malformed."""


class PrincipalRole(str, Enum):
    """What an authenticated caller may do: client RPCs, or also admin RPCs."""

    CLIENT = "client"
    ADMIN = "admin"


class Secret:
    """Holds a token or key so that repr/str/format/logging never show it; ``reveal()``
    is the one explicit way to get the value (e.g. to print a fresh token once)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(hashlib.sha256(self._value.encode()).digest())

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("Secret values are not picklable")


@dataclass(frozen=True)
class Identity:
    """Who an authenticated request comes from."""

    client_id: str
    role: PrincipalRole

    @property
    def is_admin(self) -> bool:
        return self.role is PrincipalRole.ADMIN


@dataclass(frozen=True)
class ClientCredential:
    """What a client (or admin) holds: its id, role and shared secret (repr redacts)."""

    client_id: str
    secret: bytes = field(repr=False)
    role: PrincipalRole = PrincipalRole.CLIENT

    def __repr__(self) -> str:
        return (
            f"ClientCredential(client_id={self.client_id!r}, role={self.role.value!r}, "
            "secret=<redacted>)"
        )

    __str__ = __repr__

    @property
    def identity(self) -> Identity:
        return Identity(self.client_id, self.role)

    def save(self, path: Path) -> None:
        """Write as JSON with mode 0600 (atomic)."""
        body = {
            "client_id": self.client_id,
            "role": self.role.value,
            "secret": base64.b64encode(self.secret).decode("ascii"),
        }
        write_secret_file(Path(path), json.dumps(body).encode("utf-8"))

    @classmethod
    def load(cls, path: Path) -> ClientCredential:
        """Read a credential written by ``save``; refuses group/other-readable files."""
        path = Path(path)
        try:
            check_secret_permissions(path)
            body = json.loads(path.read_text("utf-8"))
            credential = cls(
                client_id=validate_client_id(str(body["client_id"])),
                secret=base64.b64decode(str(body["secret"]), validate=True),
                role=PrincipalRole(body.get("role", "client")),
            )
        except SecureFileError as exc:
            raise CredentialFileError(str(exc)) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CredentialFileError(
                f"cannot read credential file {path}: {type(exc).__name__}: {exc}"
            ) from None
        if len(credential.secret) < 16:
            raise CredentialFileError(f"credential file {path} holds a too-short secret")
        return credential


@dataclass(frozen=True)
class StoredCredential:
    """The server's record of one principal (the secret is needed to check HMACs)."""

    client_id: str
    secret: bytes = field(repr=False)
    role: PrincipalRole = PrincipalRole.CLIENT
    created_at: float = 0.0
    expires_at: float | None = None
    revoked: bool = False


@dataclass(frozen=True)
class EnrollmentTokenRecord:
    """Server-side record of an enrollment token: only its SHA-256 is kept."""

    token_hash: str
    created_at: float
    expires_at: float | None = None
    client_id: str | None = None
    role: PrincipalRole = PrincipalRole.CLIENT


@dataclass(frozen=True)
class IssuedEnrollmentToken:
    """A freshly made token: ``token.reveal()`` is shown to the operator once."""

    token: Secret
    record: EnrollmentTokenRecord


class CredentialStore(Protocol):
    """Where the server keeps credentials and enrollment tokens (in memory, SQLite, ...).

    ``take_enrollment_token`` must be atomic: of two concurrent calls with one hash, at
    most one returns the record (that is what makes tokens one-time).
    """

    def get_credential(self, client_id: str) -> StoredCredential | None: ...

    def put_credential(self, credential: StoredCredential) -> None: ...

    def revoke(self, client_id: str) -> bool: ...

    def put_enrollment_token(self, record: EnrollmentTokenRecord) -> None: ...

    def take_enrollment_token(self, token_hash: str) -> EnrollmentTokenRecord | None: ...


class InMemoryCredentialStore:
    """Thread-safe CredentialStore for tests and single-process servers without state."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._credentials: dict[str, StoredCredential] = {}
        self._tokens: dict[str, EnrollmentTokenRecord] = {}

    def get_credential(self, client_id: str) -> StoredCredential | None:
        with self._lock:
            return self._credentials.get(client_id)

    def put_credential(self, credential: StoredCredential) -> None:
        with self._lock:
            self._credentials[credential.client_id] = credential

    def revoke(self, client_id: str) -> bool:
        with self._lock:
            current = self._credentials.get(client_id)
            if current is None:
                return False
            self._credentials[client_id] = replace(current, revoked=True)
            return True

    def put_enrollment_token(self, record: EnrollmentTokenRecord) -> None:
        with self._lock:
            self._tokens[record.token_hash] = record

    def take_enrollment_token(self, token_hash: str) -> EnrollmentTokenRecord | None:
        with self._lock:
            return self._tokens.pop(token_hash, None)

    def get_client_secret(self, client_id: str) -> bytes | None:
        """Secret of an active (not revoked) principal, or None."""
        credential = self.get_credential(client_id)
        return None if credential is None or credential.revoked else credential.secret

    def is_revoked(self, client_id: str) -> bool:
        credential = self.get_credential(client_id)
        return credential is not None and credential.revoked


def validate_client_id(client_id: str) -> str:
    """Client ids: 1-63 of letters, digits, '.', '_', '-' (they end up in logs and paths)."""
    if not isinstance(client_id, str) or not _CLIENT_ID_RE.match(client_id):
        raise EnrollmentError(
            f"invalid client id {client_id!r}: use 1-63 letters, digits, '.', '_' or '-'"
        )
    return client_id


def hash_token(token: str) -> str:
    """SHA-256 hex of a token: what the store keeps instead of the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_enrollment_token(
    store: CredentialStore,
    ttl_s: float | None = None,
    client_id: str | None = None,
    role: PrincipalRole = PrincipalRole.CLIENT,
    now: float | None = None,
) -> IssuedEnrollmentToken:
    """Make a one-time token (optionally expiring after ``ttl_s`` and bound to ``client_id``)."""
    if ttl_s is not None and not (math.isfinite(ttl_s) and ttl_s > 0):
        raise EnrollmentError(f"token ttl must be a positive number of seconds, got {ttl_s}")
    if client_id is not None:
        validate_client_id(client_id)
        _refuse_other_role(store.get_credential(client_id), role)
    created = time.time() if now is None else now
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    record = EnrollmentTokenRecord(
        token_hash=hash_token(token),
        created_at=created,
        expires_at=None if ttl_s is None else created + ttl_s,
        client_id=client_id,
        role=role,
    )
    store.put_enrollment_token(record)
    return IssuedEnrollmentToken(token=Secret(token), record=record)


def _new_credential(
    store: CredentialStore,
    client_id: str,
    role: PrincipalRole,
    now: float,
    credential_ttl_s: float | None,
) -> ClientCredential:
    secret = secrets.token_bytes(SECRET_BYTES)
    store.put_credential(
        StoredCredential(
            client_id=client_id,
            secret=secret,
            role=role,
            created_at=now,
            expires_at=None if credential_ttl_s is None else now + credential_ttl_s,
        )
    )
    return ClientCredential(client_id=client_id, secret=secret, role=role)


def enroll(
    store: CredentialStore,
    token: str,
    requested_client_id: str | None = None,
    now: float | None = None,
    credential_ttl_s: float | None = None,
) -> ClientCredential:
    """Exchange a one-time token for a fresh per-client credential.

    The client id is the one bound to the token, else ``requested_client_id``, else a
    generated ``client-<hex>``. A bound token may re-key an existing client (lost
    secret); an unbound token cannot take over an id that is already enrolled.
    """
    moment = time.time() if now is None else now
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
        raise EnrollmentError("enrollment token is malformed (expected 'cfe_...')")
    record = store.take_enrollment_token(hash_token(token))
    if record is None:
        raise EnrollmentError("enrollment token is unknown or was already used")
    if record.expires_at is not None and moment > record.expires_at:
        raise EnrollmentError("enrollment token has expired; ask the operator for a new one")
    try:
        if record.client_id is not None:
            if requested_client_id and requested_client_id != record.client_id:
                raise EnrollmentError(
                    f"this token is bound to client id {record.client_id!r}, "
                    f"not {requested_client_id!r}"
                )
            client_id = record.client_id
            # a bound token re-keys a principal of its own role only: never the operator's
            _refuse_other_role(store.get_credential(client_id), record.role)
        elif requested_client_id:
            client_id = validate_client_id(requested_client_id)
            if store.get_credential(client_id) is not None:
                raise EnrollmentError(
                    f"client id {client_id!r} is already enrolled; choose another or ask the "
                    "operator for a token bound to it"
                )
        else:
            client_id = f"client-{secrets.token_hex(6)}"
    except EnrollmentError:
        store.put_enrollment_token(record)  # not used: give it back
        raise
    return _new_credential(store, client_id, record.role, moment, credential_ttl_s)


def _refuse_other_role(existing: StoredCredential | None, role: PrincipalRole) -> None:
    """An enrollment token must not take over a principal of another role (a client token
    for the admin's id would turn the operator into a client and lock them out)."""
    if existing is not None and existing.role is not role:
        raise EnrollmentError(
            f"{existing.client_id!r} is an enrolled {existing.role.value}; a {role.value} "
            "token cannot be created for or redeemed as it"
        )


def create_admin_credential(
    store: CredentialStore,
    admin_id: str = "admin",
    ttl_s: float | None = None,
    now: float | None = None,
) -> ClientCredential:
    """Make (or re-key) an admin credential directly (the operator runs this locally)."""
    validate_client_id(admin_id)
    moment = time.time() if now is None else now
    return _new_credential(store, admin_id, PrincipalRole.ADMIN, moment, ttl_s)


def canonical_request(
    method: str, client_id: str, timestamp_ms: int, nonce: str, body_sha256: str
) -> bytes:
    """The exact bytes the HMAC covers (newline-separated; fields contain no newline)."""
    return b"\n".join(
        [
            SIGNATURE_VERSION,
            method.encode("utf-8"),
            client_id.encode("utf-8"),
            str(timestamp_ms).encode("ascii"),
            nonce.encode("ascii"),
            body_sha256.encode("ascii"),
        ]
    )


def body_digest(body: bytes | bytearray | memoryview) -> str:
    """The hex SHA-256 of a serialized request body, as signed in HEADER_BODY_SHA256."""
    return hashlib.sha256(body).hexdigest()


def _mac(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign_request(
    credential: ClientCredential,
    method: str,
    body: bytes | bytearray | memoryview = b"",
    now: float | None = None,
    nonce: str | None = None,
) -> tuple[tuple[str, str], ...]:
    """Metadata pairs authenticating one call of ``method`` ("/pkg.Service/Method") whose
    serialized request (first message of a client stream) is ``body``."""
    timestamp_ms = int((time.time() if now is None else now) * 1000)
    nonce = nonce or secrets.token_hex(NONCE_BYTES)
    digest = body_digest(body)
    signature = _mac(
        credential.secret,
        canonical_request(method, credential.client_id, timestamp_ms, nonce, digest),
    )
    return (
        (HEADER_CLIENT_ID, credential.client_id),
        (HEADER_TIMESTAMP, str(timestamp_ms)),
        (HEADER_NONCE, nonce),
        (HEADER_BODY_SHA256, digest),
        (HEADER_SIGNATURE, signature),
    )


class NonceReplayCache:
    """Remembers (client, nonce) until its timestamp leaves the skew window.

    Bounded: when full, the entry closest to expiry is dropped and its timestamp becomes
    a floor; requests at or below the floor are refused, so an evicted nonce can never
    be replayed (at worst very old-but-in-window requests are refused under flood).
    With a ``journal`` every accepted nonce is written to disk first and a new cache (a
    restarted server) starts from the journal's live entries.
    """

    def __init__(
        self,
        max_entries: int = DEFAULT_REPLAY_CACHE_ENTRIES,
        journal: NonceJournal | None = None,
        now: float | None = None,
    ) -> None:
        if max_entries <= 0:
            raise ValueError("replay cache needs at least one entry")
        self._max = max_entries
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], int] = {}
        self._expiry: list[tuple[float, tuple[str, str]]] = []
        self._floor_ms = -1
        self._journal = journal
        if journal is not None:
            for entry in journal.load(time.time() if now is None else now):
                self._insert_locked((entry.client_id, entry.nonce), entry.timestamp_ms,
                                    entry.expires_at)  # fmt: skip

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_add(
        self, client_id: str, nonce: str, timestamp_ms: int, expires_at: float, now: float
    ) -> str | None:
        """Record the nonce; returns None when fresh, else why it is refused."""
        key = (client_id, nonce)
        with self._lock:
            while self._expiry and self._expiry[0][0] < now:
                _, old = heapq.heappop(self._expiry)
                self._seen.pop(old, None)
            if key in self._seen:
                return "nonce was already used (replayed request)"
            if timestamp_ms <= self._floor_ms:
                return "request is older than the replay window under load; retry"
            if self._journal is not None:  # on disk before the request runs
                self._journal.append(JournalEntry(client_id, nonce, timestamp_ms, expires_at))
            self._insert_locked(key, timestamp_ms, expires_at)
            if self._journal is not None and self._journal.needs_compaction(len(self._seen)):
                expiry = {k: e for e, k in self._expiry}
                self._journal.compact(
                    JournalEntry(c, n, t, expiry.get((c, n), 0.0))
                    for (c, n), t in self._seen.items()
                )
            return None

    def _insert_locked(self, key: tuple[str, str], timestamp_ms: int, expires_at: float) -> None:
        while len(self._seen) >= self._max:
            _, old = heapq.heappop(self._expiry)
            evicted = self._seen.pop(old, None)
            if evicted is not None:
                self._floor_ms = max(self._floor_ms, evicted)
        self._seen[key] = timestamp_ms
        heapq.heappush(self._expiry, (expires_at, key))


class RequestVerifier:
    """Checks the signature metadata of one request and returns the caller's Identity."""

    def __init__(
        self,
        store: CredentialStore,
        max_skew_s: float = DEFAULT_MAX_SKEW_S,
        replay_cache: NonceReplayCache | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_skew_s <= 0:
            raise ValueError("max_skew_s must be positive")
        self._store = store
        self._skew_s = max_skew_s
        self._cache = replay_cache if replay_cache is not None else NonceReplayCache()
        self._clock = clock

    def verify(self, method: str, metadata: Mapping[str, str]) -> Identity:
        """Raise AuthenticationError (human message) unless the request is authentic."""
        client_id = metadata.get(HEADER_CLIENT_ID)
        timestamp = metadata.get(HEADER_TIMESTAMP)
        nonce = metadata.get(HEADER_NONCE)
        body = metadata.get(HEADER_BODY_SHA256)
        signature = metadata.get(HEADER_SIGNATURE)
        if not (client_id and timestamp and nonce and signature):
            raise AuthenticationError(
                "missing credentials: this RPC requires a signed request (enroll first and "
                "configure the client credential)"
            )
        if not (timestamp.isdigit() and len(timestamp) <= 16):
            raise AuthenticationError("malformed request timestamp")
        if not _NONCE_RE.match(nonce) or not _SIGNATURE_RE.match(signature):
            raise AuthenticationError("malformed request nonce or signature")
        if body is None or not _SIGNATURE_RE.match(body):
            raise AuthenticationError(
                f"the request signature does not cover its body (no {HEADER_BODY_SHA256}); "
                "this client is too old for the server"
            )
        now = self._clock()
        timestamp_ms = int(timestamp)
        skew = timestamp_ms / 1000.0 - now
        if abs(skew) > self._skew_s:
            raise AuthenticationError(
                f"request timestamp is {skew:+.0f} s off the server clock (allowed "
                f"±{self._skew_s:.0f} s): expired request or wrong client clock"
            )
        stored = self._store.get_credential(client_id)
        expected = _mac(
            stored.secret if stored is not None else b"\x00" * SECRET_BYTES,
            canonical_request(method, client_id, timestamp_ms, nonce, body),
        )
        if stored is None or not hmac.compare_digest(expected, signature):
            raise AuthenticationError(
                f"invalid credentials for client {client_id!r} (unknown client or bad signature)"
            )
        if stored.revoked:
            raise AuthenticationError(f"credential of client {client_id!r} was revoked")
        if stored.expires_at is not None and now > stored.expires_at:
            raise AuthenticationError(
                f"credential of client {client_id!r} has expired; enroll again"
            )
        refused = self._cache.check_and_add(
            client_id, nonce, timestamp_ms, timestamp_ms / 1000.0 + self._skew_s, now
        )
        if refused is not None:
            raise AuthenticationError(refused)
        return Identity(client_id=client_id, role=stored.role)
