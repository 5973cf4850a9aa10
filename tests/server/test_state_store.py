"""StateStore contract, run against the in-memory and the SQLite implementation."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from crossfed.server.errors import ConfigurationError, StateStoreError
from crossfed.server.state import (
    ClientRecord,
    InMemoryStateStore,
    RoundRecord,
    RunRecord,
    SqliteStateStore,
    StateStore,
    UploadRecord,
    open_state_store,
)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    impl: StateStore = (
        InMemoryStateStore() if request.param == "memory" else SqliteStateStore(tmp_path / "s.db")
    )
    yield impl
    impl.close()


def test_run_roundtrip(store: StateStore) -> None:
    assert store.get_run() is None
    run = RunRecord("r1", "running", 5, 2, 10.0, "hi", 0.5)
    store.put_run(run)
    assert store.get_run() == run
    run.state = "paused"
    store.put_run(run)
    got = store.get_run()
    assert got is not None and got.state == "paused"


def test_clients_upsert_and_order(store: StateStore) -> None:
    store.put_client(ClientRecord("b", 1, 10))
    store.put_client(ClientRecord("a", 2, 5, num_text_only=5, last_seen_unix_s=3.5))
    store.put_client(ClientRecord("b", 3, 11, state="selected"))
    assert [c.client_id for c in store.list_clients()] == ["a", "b"]
    b = store.get_client("b")
    assert b is not None and (b.modality, b.num_samples, b.state) == (3, 11, "selected")
    assert store.get_client("zzz") is None


def test_rounds_attempts_and_commit(store: StateStore) -> None:
    store.put_round(RoundRecord(1, 1, "failed", 1.0, 2.0, ["a"], message="x"))
    store.put_round(RoundRecord(1, 2, "open", 3.0, 4.0, ["a", "b"]))
    store.put_round(RoundRecord(2, 1, "open", 5.0, 6.0, []))
    assert [(r.round, r.attempt) for r in store.list_rounds()] == [(2, 1), (1, 2), (1, 1)]
    assert len(store.list_rounds(limit=2)) == 2
    rec = store.get_round(1, 2)
    assert rec is not None and rec.selected == ["a", "b"]
    rec.state, rec.metrics = "committed", {"loss": 0.25}
    store.commit_round(rec, RunRecord("r", "running", 3, last_committed_round=1))
    got = store.get_round(1, 2)
    run = store.get_run()
    assert got is not None and got.state == "committed" and got.metrics == {"loss": 0.25}
    assert run is not None and run.last_committed_round == 1


def test_upload_id_idempotent_per_client_and_round_attempt(store: StateStore) -> None:
    up = UploadRecord("u1", "a", 1, 1, 10, 1.0, "ab", {"mapper": 4}, {"loss": 1.0})
    assert store.add_upload(up)
    assert not store.add_upload(up)
    assert store.add_upload(UploadRecord("u1", "a", 1, 2, 10, 2.0, "ab"))  # new attempt
    assert store.add_upload(UploadRecord("u2", "b", 1, 1, 7, 3.0, "cd"))
    # another client's upload_id is its own: it does not shadow (or get shadowed by) a's
    assert store.add_upload(UploadRecord("u1", "b", 1, 1, 5, 4.0, "ef"))
    assert [(u.client_id, u.upload_id) for u in store.list_uploads(1, 1)] == [
        ("a", "u1"),
        ("b", "u2"),
        ("b", "u1"),
    ]
    got = store.get_upload(1, 1, "a", "u1")
    assert got is not None and got.module_samples == {"mapper": 4}
    other = store.get_upload(1, 1, "b", "u1")
    assert other is not None and other.num_samples == 5
    assert store.get_upload(9, 1, "a", "u1") is None


def test_schema_1_database_is_migrated_to_per_client_upload_ids(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE uploads (
            round INTEGER NOT NULL, attempt INTEGER NOT NULL, upload_id TEXT NOT NULL,
            seq INTEGER NOT NULL, client_id TEXT NOT NULL, num_samples INTEGER NOT NULL,
            received_unix_s REAL NOT NULL, payload_sha256 TEXT NOT NULL,
            module_samples TEXT NOT NULL, metrics TEXT NOT NULL,
            PRIMARY KEY (round, attempt, upload_id)
        );
        INSERT INTO uploads VALUES (1, 1, 'u1', 0, 'a', 10, 1.0, 'ab', '{}', '{}');
        """
    )
    conn.commit()
    conn.close()
    store = SqliteStateStore(path)
    assert [u.client_id for u in store.list_uploads(1, 1)] == ["a"]
    assert store.add_upload(UploadRecord("u1", "b", 1, 1, 5, 2.0, "cd"))
    store.close()
    version = sqlite3.connect(path).execute("SELECT value FROM meta").fetchone()
    assert version == ("2",)


def test_events_monotone_ids_and_paging(store: StateStore) -> None:
    ids = [store.append_event(f"k{i}", float(i), i, "c", "m", {"v": i}).event_id for i in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    after = store.events_after(ids[1])
    assert [e.kind for e in after] == ["k2", "k3", "k4"]
    assert after[0].values == {"v": 2.0}
    assert [e.kind for e in store.events_after(ids[0], limit=2)] == ["k1", "k2"]


def test_concurrent_event_appends_get_unique_ids(store: StateStore) -> None:
    def work() -> None:
        for _ in range(50):
            store.append_event("x", 0.0)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [e.event_id for e in store.events_after(0, limit=1000)]
    assert len(ids) == 200 and len(set(ids)) == 200


def test_sqlite_persists_across_reopen_in_wal_mode(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    first = SqliteStateStore(db)
    first.put_run(RunRecord("r9", "running", 4, 3))
    first.append_event("a", 1.0)
    first.close()
    second = SqliteStateStore(db)
    run = second.get_run()
    assert run is not None and run.last_committed_round == 3
    assert second.append_event("b", 2.0).event_id == 2
    mode = second._conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    second.close()


def test_factory_locations(tmp_path: Path) -> None:
    assert isinstance(open_state_store("memory://"), InMemoryStateStore)
    s1 = open_state_store(tmp_path / "dir")
    assert isinstance(s1, SqliteStateStore) and s1.path == tmp_path / "dir" / "state.db"
    s2 = open_state_store(f"sqlite://{tmp_path}/x.db")
    assert isinstance(s2, SqliteStateStore) and s2.path == tmp_path / "x.db"
    with pytest.raises(ConfigurationError, match="unknown state store scheme"):
        open_state_store("postgres://db")


def test_sqlite_rejects_garbage_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateStoreError, match="cannot open state database"):
        SqliteStateStore(bad)
