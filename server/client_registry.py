"""The federation's clients as the round engine sees them: records in memory, written to the
state store, liveness (heard from since this process started, within the client timeout).
Not locked itself: the engine calls it under its lock."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from crossfed.server.errors import StateStoreError, UnknownClientError
from crossfed.server.state.base import StateStore
from crossfed.server.state.records import (
    CLIENT_REGISTERED,
    CLIENT_REMOVED,
    CLIENT_SELECTED,
    CLIENT_UPLOADED,
    ClientRecord,
)

log = logging.getLogger(__name__)

#: last_seen is written to the database at most this often per client (heartbeats are many)
LAST_SEEN_PERSIST_S = 5.0


class ClientRegistry:
    """Client records by id, persisted on change; ``timeout_s`` gives the current policy's
    client timeout (the policy can be swapped live)."""

    def __init__(self, store: StateStore, timeout_s: Callable[[], float]) -> None:
        self.store = store
        self._timeout_s = timeout_s
        self.records: dict[str, ClientRecord] = {c.client_id: c for c in store.list_clients()}
        # recovery each client registered with in this process ("feature": no SD uploads)
        self.recovery_of: dict[str, str] = {}
        self._persisted_seen: dict[str, float] = {}
        # only clients heard from since this engine started are selectable (after a restart,
        # stored last_seen times describe connections that died with the old process)
        self._seen_since_start: set[str] = set()

    def get(self, client_id: str) -> ClientRecord | None:
        """The record of ``client_id``, removed or not (None: never registered)."""
        return self.records.get(client_id)

    def known(self, client_id: str) -> ClientRecord:
        """The record of a registered, not removed client, else `UnknownClientError`."""
        client = self.records.get(client_id)
        if client is None or client.state == CLIENT_REMOVED:
            raise UnknownClientError(
                f"client {client_id!r} is not registered with this server; call Register first"
            )
        return client

    def online(self, client: ClientRecord, now: float) -> bool:
        """Registered, heard from since this process started, and within the timeout."""
        return (
            client.state != CLIENT_REMOVED
            and client.client_id in self._seen_since_start
            and now - client.last_seen_unix_s <= self._timeout_s()
        )

    def online_ids(self, now: float) -> list[str]:
        """Ids of the online clients (what a round selects from)."""
        return [c.client_id for c in self.records.values() if self.online(c, now)]

    def save(self, client: ClientRecord) -> None:
        """Keep ``client`` and write it to the store."""
        self.records[client.client_id] = client
        self._persisted_seen[client.client_id] = client.last_seen_unix_s
        self.store.put_client(client)

    def touch(self, client: ClientRecord, now: float) -> None:
        """The client was heard from (persisted at most every `LAST_SEEN_PERSIST_S`)."""
        client.last_seen_unix_s = now
        self._seen_since_start.add(client.client_id)
        if now - self._persisted_seen.get(client.client_id, 0.0) >= LAST_SEEN_PERSIST_S:
            self.save(client)

    def mark_seen(self, client_id: str) -> None:
        """Heard from in this process (a registration)."""
        self._seen_since_start.add(client_id)

    def snapshot(self, now: float) -> list[ClientRecord]:
        """Copies of every record, sorted by id, with 'offline' for silent clients."""
        out = []
        for c in sorted(self.records.values(), key=lambda c: c.client_id):
            copy = ClientRecord(**vars(c))
            if c.state != CLIENT_REMOVED and not self.online(c, now):
                copy.state = "offline"
            out.append(copy)
        return out

    def release(self, client_ids: Iterable[str]) -> None:
        """Selected clients become selectable again: all in memory first, then persisted
        (best effort: a restart re-reads every client as registered anyway)."""
        released = [
            c
            for c in (self.records.get(cid) for cid in client_ids)
            if c is not None and c.state in (CLIENT_SELECTED, CLIENT_UPLOADED)
        ]
        for client in released:
            client.state = CLIENT_REGISTERED
        for client in released:
            try:
                self.save(client)
            except StateStoreError as exc:
                log.error("could not record the release of client %s: %s", client.client_id, exc)

    def reset_after_restart(self) -> None:
        """Clients selected for a round that died with the old process are registered again."""
        for client in self.records.values():
            if client.state in (CLIENT_SELECTED, CLIENT_UPLOADED):
                client.state = CLIENT_REGISTERED
                self.store.put_client(client)
