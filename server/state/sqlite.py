"""`StateStore` in a SQLite database (stdlib sqlite3, WAL mode): survives a kill -9, so a
restarted server resumes the run where its last committed round left it."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crossfed.server.errors import StateStoreError
from crossfed.server.state.base import StateStore
from crossfed.server.state.records import (
    ClientRecord,
    EventRecord,
    RoundRecord,
    RunRecord,
    UploadRecord,
)

SCHEMA_VERSION = 2  # 2: an upload_id is unique per client, not per round attempt

_UPLOADS_TABLE = """CREATE TABLE IF NOT EXISTS uploads (
    round INTEGER NOT NULL, attempt INTEGER NOT NULL, upload_id TEXT NOT NULL,
    seq INTEGER NOT NULL, client_id TEXT NOT NULL, num_samples INTEGER NOT NULL,
    received_unix_s REAL NOT NULL, payload_sha256 TEXT NOT NULL, module_samples TEXT NOT NULL,
    metrics TEXT NOT NULL,
    PRIMARY KEY (round, attempt, client_id, upload_id)
);
"""

_SCHEMA = (
    _UPLOADS_TABLE
    + """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    run_id TEXT NOT NULL, state TEXT NOT NULL, total_rounds INTEGER NOT NULL,
    last_committed_round INTEGER NOT NULL, created_unix_s REAL NOT NULL,
    message TEXT NOT NULL, epsilon_spent REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY, modality INTEGER NOT NULL, num_samples INTEGER NOT NULL,
    num_paired INTEGER NOT NULL, num_text_only INTEGER NOT NULL, num_image_only INTEGER NOT NULL,
    state TEXT NOT NULL, registered_unix_s REAL NOT NULL, last_seen_unix_s REAL NOT NULL,
    last_round INTEGER NOT NULL, rounds_completed INTEGER NOT NULL, daemon_version TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER NOT NULL, attempt INTEGER NOT NULL, state TEXT NOT NULL,
    started_unix_s REAL NOT NULL, deadline_unix_s REAL NOT NULL, selected TEXT NOT NULL,
    ended_unix_s REAL NOT NULL, received INTEGER NOT NULL, num_samples INTEGER NOT NULL,
    metrics TEXT NOT NULL, message TEXT NOT NULL, counts_as_retry INTEGER NOT NULL,
    PRIMARY KEY (round, attempt)
);
CREATE TABLE IF NOT EXISTS events (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT, time_unix_s REAL NOT NULL, kind TEXT NOT NULL,
    round INTEGER NOT NULL, client_id TEXT NOT NULL, message TEXT NOT NULL, vals TEXT NOT NULL
);
"""
)


class SqliteStateStore(StateStore):
    """One SQLite file (WAL journal, synchronous=FULL) shared by the server's threads."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
            self._check_schema_version()
        except sqlite3.DatabaseError as exc:
            raise StateStoreError(f"cannot open state database {self.path}: {exc}") from exc

    def _check_schema_version(self) -> None:
        row = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self._conn.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        elif int(row[0]) == 1:
            self._migrate_from_1()
        elif int(row[0]) != SCHEMA_VERSION:
            raise StateStoreError(
                f"state database {self.path} has schema version {row[0]}, this server "
                f"understands {SCHEMA_VERSION}; use a fresh --state-dir"
            )

    def _migrate_from_1(self) -> None:
        """Version 1 keyed uploads by (round, attempt, upload_id): one client's upload_id
        shadowed another's. Rebuild the table with the client in the key."""
        columns = (
            "round, attempt, upload_id, seq, client_id, num_samples, received_unix_s,"
            " payload_sha256, module_samples, metrics"
        )
        with self._tx() as conn:
            conn.execute("ALTER TABLE uploads RENAME TO uploads_v1")
            conn.execute(_UPLOADS_TABLE)
            conn.execute(f"INSERT INTO uploads({columns}) SELECT {columns} FROM uploads_v1")
            conn.execute("DROP TABLE uploads_v1")
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
            )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """Serialize access and run the body in one IMMEDIATE transaction."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except (sqlite3.DatabaseError, OverflowError) as exc:  # Overflow: int > 64 bits
                raise StateStoreError(f"state database {self.path}: {exc}") from exc

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._conn.execute(sql, args).fetchall())
            except sqlite3.DatabaseError as exc:
                raise StateStoreError(f"state database {self.path}: {exc}") from exc

    # -- run ---------------------------------------------------------------------------
    def get_run(self) -> RunRecord | None:
        rows = self._query(
            "SELECT run_id, state, total_rounds, last_committed_round, created_unix_s, message,"
            " epsilon_spent FROM run WHERE id = 1"
        )
        if not rows:
            return None
        r = rows[0]
        return RunRecord(r[0], r[1], int(r[2]), int(r[3]), float(r[4]), r[5], float(r[6]))

    def put_run(self, run: RunRecord) -> None:
        with self._tx() as conn:
            self._write_run(conn, run)

    @staticmethod
    def _write_run(conn: sqlite3.Connection, run: RunRecord) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO run(id, run_id, state, total_rounds, last_committed_round,"
            " created_unix_s, message, epsilon_spent) VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
            (
                run.run_id,
                run.state,
                run.total_rounds,
                run.last_committed_round,
                run.created_unix_s,
                run.message,
                run.epsilon_spent,
            ),
        )

    # -- clients -----------------------------------------------------------------------
    _CLIENT_COLS = (
        "client_id, modality, num_samples, num_paired, num_text_only, num_image_only, state,"
        " registered_unix_s, last_seen_unix_s, last_round, rounds_completed, daemon_version"
    )

    @staticmethod
    def _client_of(r: tuple[Any, ...]) -> ClientRecord:
        return ClientRecord(
            client_id=r[0],
            modality=int(r[1]),
            num_samples=int(r[2]),
            num_paired=int(r[3]),
            num_text_only=int(r[4]),
            num_image_only=int(r[5]),
            state=r[6],
            registered_unix_s=float(r[7]),
            last_seen_unix_s=float(r[8]),
            last_round=int(r[9]),
            rounds_completed=int(r[10]),
            daemon_version=r[11],
        )

    def put_client(self, client: ClientRecord) -> None:
        with self._tx() as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO clients({self._CLIENT_COLS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    client.client_id,
                    client.modality,
                    client.num_samples,
                    client.num_paired,
                    client.num_text_only,
                    client.num_image_only,
                    client.state,
                    client.registered_unix_s,
                    client.last_seen_unix_s,
                    client.last_round,
                    client.rounds_completed,
                    client.daemon_version,
                ),
            )

    def get_client(self, client_id: str) -> ClientRecord | None:
        rows = self._query(
            f"SELECT {self._CLIENT_COLS} FROM clients WHERE client_id = ?", (client_id,)
        )
        return self._client_of(rows[0]) if rows else None

    def list_clients(self) -> list[ClientRecord]:
        rows = self._query(f"SELECT {self._CLIENT_COLS} FROM clients ORDER BY client_id")
        return [self._client_of(r) for r in rows]

    # -- rounds ------------------------------------------------------------------------
    _ROUND_COLS = (
        "round, attempt, state, started_unix_s, deadline_unix_s, selected, ended_unix_s,"
        " received, num_samples, metrics, message, counts_as_retry"
    )

    @staticmethod
    def _round_of(r: tuple[Any, ...]) -> RoundRecord:
        return RoundRecord(
            round=int(r[0]),
            attempt=int(r[1]),
            state=r[2],
            started_unix_s=float(r[3]),
            deadline_unix_s=float(r[4]),
            selected=list(json.loads(r[5])),
            ended_unix_s=float(r[6]),
            received=int(r[7]),
            num_samples=int(r[8]),
            metrics={k: float(v) for k, v in json.loads(r[9]).items()},
            message=r[10],
            counts_as_retry=bool(r[11]),
        )

    def _write_round(self, conn: sqlite3.Connection, rec: RoundRecord) -> None:
        conn.execute(
            f"INSERT OR REPLACE INTO rounds({self._ROUND_COLS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rec.round,
                rec.attempt,
                rec.state,
                rec.started_unix_s,
                rec.deadline_unix_s,
                json.dumps(list(rec.selected)),
                rec.ended_unix_s,
                rec.received,
                rec.num_samples,
                json.dumps(rec.metrics),
                rec.message,
                int(rec.counts_as_retry),
            ),
        )

    def put_round(self, record: RoundRecord) -> None:
        with self._tx() as conn:
            self._write_round(conn, record)

    def get_round(self, round_no: int, attempt: int) -> RoundRecord | None:
        rows = self._query(
            f"SELECT {self._ROUND_COLS} FROM rounds WHERE round = ? AND attempt = ?",
            (round_no, attempt),
        )
        return self._round_of(rows[0]) if rows else None

    def list_rounds(self, limit: int = 0) -> list[RoundRecord]:
        sql = f"SELECT {self._ROUND_COLS} FROM rounds ORDER BY round DESC, attempt DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [self._round_of(r) for r in self._query(sql)]

    def commit_round(self, record: RoundRecord, run: RunRecord) -> None:
        with self._tx() as conn:
            self._write_round(conn, record)
            self._write_run(conn, run)

    # -- uploads -----------------------------------------------------------------------
    _UPLOAD_COLS = (
        "upload_id, client_id, round, attempt, num_samples, received_unix_s, payload_sha256,"
        " module_samples, metrics"
    )

    @staticmethod
    def _upload_of(r: tuple[Any, ...]) -> UploadRecord:
        return UploadRecord(
            upload_id=r[0],
            client_id=r[1],
            round=int(r[2]),
            attempt=int(r[3]),
            num_samples=int(r[4]),
            received_unix_s=float(r[5]),
            payload_sha256=r[6],
            module_samples={k: int(v) for k, v in json.loads(r[7]).items()},
            metrics={k: float(v) for k, v in json.loads(r[8]).items()},
        )

    def add_upload(self, upload: UploadRecord) -> bool:
        with self._tx() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO uploads(round, attempt, upload_id, seq, client_id,"
                " num_samples, received_unix_s, payload_sha256, module_samples, metrics)"
                " VALUES (?, ?, ?, (SELECT COUNT(*) FROM uploads), ?, ?, ?, ?, ?, ?)",
                (
                    upload.round,
                    upload.attempt,
                    upload.upload_id,
                    upload.client_id,
                    upload.num_samples,
                    upload.received_unix_s,
                    upload.payload_sha256,
                    json.dumps(upload.module_samples),
                    json.dumps(upload.metrics),
                ),
            )
            return cur.rowcount == 1

    def get_upload(
        self, round_no: int, attempt: int, client_id: str, upload_id: str
    ) -> UploadRecord | None:
        rows = self._query(
            f"SELECT {self._UPLOAD_COLS} FROM uploads"
            " WHERE round = ? AND attempt = ? AND client_id = ? AND upload_id = ?",
            (round_no, attempt, client_id, upload_id),
        )
        return self._upload_of(rows[0]) if rows else None

    def list_uploads(self, round_no: int, attempt: int) -> list[UploadRecord]:
        rows = self._query(
            f"SELECT {self._UPLOAD_COLS} FROM uploads WHERE round = ? AND attempt = ? ORDER BY seq",
            (round_no, attempt),
        )
        return [self._upload_of(r) for r in rows]

    # -- events ------------------------------------------------------------------------
    def append_event(
        self,
        kind: str,
        time_unix_s: float,
        round_no: int = 0,
        client_id: str = "",
        message: str = "",
        values: dict[str, float] | None = None,
    ) -> EventRecord:
        vals = dict(values or {})
        with self._tx() as conn:
            cur = conn.execute(
                "INSERT INTO events(time_unix_s, kind, round, client_id, message, vals)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (time_unix_s, kind, round_no, client_id, message, json.dumps(vals)),
            )
            event_id = int(cur.lastrowid or 0)
        return EventRecord(event_id, time_unix_s, kind, round_no, client_id, message, vals)

    def events_after(self, after_event_id: int, limit: int = 1000) -> list[EventRecord]:
        rows = self._query(
            "SELECT event_id, time_unix_s, kind, round, client_id, message, vals FROM events"
            " WHERE event_id > ? ORDER BY event_id LIMIT ?",
            (after_event_id, limit),
        )
        return [
            EventRecord(
                int(r[0]),
                float(r[1]),
                r[2],
                int(r[3]),
                r[4],
                r[5],
                {k: float(v) for k, v in json.loads(r[6]).items()},
            )
            for r in rows
        ]

    # -- run settings (the meta table, beside schema_version) ---------------------------
    def get_setting(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (f"setting:{key}",))
        return str(rows[0][0]) if rows else None

    def put_setting(self, key: str, value: str) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (f"setting:{key}", value)
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()
