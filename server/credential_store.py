"""SQLite-backed `CredentialStore` (crossfed.common.crypto.identity protocol): per-client
secrets and hashed one-time enrollment tokens that survive a server restart. The file holds
secrets, so it is created 0600."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

from crossfed.common.crypto.identity import (
    EnrollmentTokenRecord,
    PrincipalRole,
    StoredCredential,
)
from crossfed.server.errors import StateStoreError

#: The credential store's file in the server's state dir.
CREDENTIALS_DB = "credentials.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS credentials (
    client_id TEXT PRIMARY KEY, secret BLOB NOT NULL, role TEXT NOT NULL,
    created_at REAL NOT NULL, expires_at REAL, revoked INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS enrollment_tokens (
    token_hash TEXT PRIMARY KEY, created_at REAL NOT NULL, expires_at REAL,
    client_id TEXT, role TEXT NOT NULL
);
"""


class SqliteCredentialStore:
    """Credentials and enrollment tokens in one SQLite file (WAL, owner-only permissions)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            os.chmod(self.path, 0o600)
            self._conn = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
        except (OSError, sqlite3.DatabaseError) as exc:
            raise StateStoreError(f"cannot open credential database {self.path}: {exc}") from exc

    def get_credential(self, client_id: str) -> StoredCredential | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT client_id, secret, role, created_at, expires_at, revoked FROM credentials"
                " WHERE client_id = ?",
                (client_id,),
            ).fetchone()
        if row is None:
            return None
        return StoredCredential(
            client_id=row[0],
            secret=bytes(row[1]),
            role=PrincipalRole(row[2]),
            created_at=float(row[3]),
            expires_at=None if row[4] is None else float(row[4]),
            revoked=bool(row[5]),
        )

    def put_credential(self, credential: StoredCredential) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO credentials VALUES (?, ?, ?, ?, ?, ?)",
                (
                    credential.client_id,
                    credential.secret,
                    credential.role.value,
                    credential.created_at,
                    credential.expires_at,
                    int(credential.revoked),
                ),
            )

    def revoke(self, client_id: str) -> bool:
        with self._lock:
            cur = self._conn.execute(
                "UPDATE credentials SET revoked = 1 WHERE client_id = ?", (client_id,)
            )
            return cur.rowcount == 1

    def put_enrollment_token(self, record: EnrollmentTokenRecord) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO enrollment_tokens VALUES (?, ?, ?, ?, ?)",
                (
                    record.token_hash,
                    record.created_at,
                    record.expires_at,
                    record.client_id,
                    record.role.value,
                ),
            )

    def take_enrollment_token(self, token_hash: str) -> EnrollmentTokenRecord | None:
        """Atomically fetch and delete (one-time use)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute(
                    "SELECT token_hash, created_at, expires_at, client_id, role"
                    " FROM enrollment_tokens WHERE token_hash = ?",
                    (token_hash,),
                ).fetchone()
                if row is not None:
                    self._conn.execute(
                        "DELETE FROM enrollment_tokens WHERE token_hash = ?", (token_hash,)
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        if row is None:
            return None
        return EnrollmentTokenRecord(
            token_hash=row[0],
            created_at=float(row[1]),
            expires_at=None if row[2] is None else float(row[2]),
            client_id=row[3],
            role=PrincipalRole(row[4]),
        )

    def close(self) -> None:
        with self._lock:
            self._conn.close()
