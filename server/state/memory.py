"""`StateStore` kept in process memory: for tests and throw-away runs (nothing survives exit)."""

from __future__ import annotations

import copy
import threading

from crossfed.server.state.base import StateStore
from crossfed.server.state.records import (
    ClientRecord,
    EventRecord,
    RoundRecord,
    RunRecord,
    UploadRecord,
)


class InMemoryStateStore(StateStore):
    """Dict-backed store; returns copies so callers cannot mutate stored state by accident."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._run: RunRecord | None = None
        self._clients: dict[str, ClientRecord] = {}
        self._rounds: dict[tuple[int, int], RoundRecord] = {}
        self._uploads: dict[tuple[int, int], dict[tuple[str, str], UploadRecord]] = {}
        self._events: list[EventRecord] = []
        self._settings: dict[str, str] = {}

    def get_setting(self, key: str) -> str | None:
        with self._lock:
            return self._settings.get(key)

    def put_setting(self, key: str, value: str) -> None:
        with self._lock:
            self._settings[key] = value

    def get_run(self) -> RunRecord | None:
        with self._lock:
            return copy.deepcopy(self._run)

    def put_run(self, run: RunRecord) -> None:
        with self._lock:
            self._run = copy.deepcopy(run)

    def put_client(self, client: ClientRecord) -> None:
        with self._lock:
            self._clients[client.client_id] = copy.deepcopy(client)

    def get_client(self, client_id: str) -> ClientRecord | None:
        with self._lock:
            return copy.deepcopy(self._clients.get(client_id))

    def list_clients(self) -> list[ClientRecord]:
        with self._lock:
            return [copy.deepcopy(self._clients[k]) for k in sorted(self._clients)]

    def put_round(self, record: RoundRecord) -> None:
        with self._lock:
            self._rounds[(record.round, record.attempt)] = copy.deepcopy(record)

    def get_round(self, round_no: int, attempt: int) -> RoundRecord | None:
        with self._lock:
            return copy.deepcopy(self._rounds.get((round_no, attempt)))

    def list_rounds(self, limit: int = 0) -> list[RoundRecord]:
        with self._lock:
            keys = sorted(self._rounds, reverse=True)
            if limit:
                keys = keys[:limit]
            return [copy.deepcopy(self._rounds[k]) for k in keys]

    def commit_round(self, record: RoundRecord, run: RunRecord) -> None:
        with self._lock:
            self._rounds[(record.round, record.attempt)] = copy.deepcopy(record)
            self._run = copy.deepcopy(run)

    def add_upload(self, upload: UploadRecord) -> bool:
        with self._lock:
            bucket = self._uploads.setdefault((upload.round, upload.attempt), {})
            key = (upload.client_id, upload.upload_id)
            if key in bucket:
                return False
            bucket[key] = copy.deepcopy(upload)
            return True

    def get_upload(
        self, round_no: int, attempt: int, client_id: str, upload_id: str
    ) -> UploadRecord | None:
        with self._lock:
            bucket = self._uploads.get((round_no, attempt), {})
            return copy.deepcopy(bucket.get((client_id, upload_id)))

    def list_uploads(self, round_no: int, attempt: int) -> list[UploadRecord]:
        with self._lock:
            return [copy.deepcopy(u) for u in self._uploads.get((round_no, attempt), {}).values()]

    def append_event(
        self,
        kind: str,
        time_unix_s: float,
        round_no: int = 0,
        client_id: str = "",
        message: str = "",
        values: dict[str, float] | None = None,
    ) -> EventRecord:
        with self._lock:
            event = EventRecord(
                event_id=len(self._events) + 1,
                time_unix_s=time_unix_s,
                kind=kind,
                round=round_no,
                client_id=client_id,
                message=message,
                values=dict(values or {}),
            )
            self._events.append(event)
            return copy.deepcopy(event)

    def events_after(self, after_event_id: int, limit: int = 1000) -> list[EventRecord]:
        with self._lock:
            # ids are 1..n in list order, so event id k sits at index k-1
            start = max(after_event_id, 0)
            return [copy.deepcopy(e) for e in self._events[start : start + limit]]
