"""Persistent run state behind one small interface (Flower-style): the abstract
`StateStore`, an in-memory implementation for tests, SQLite for real use, and a factory."""

from crossfed.server.state.base import StateStore
from crossfed.server.state.factory import open_state_store
from crossfed.server.state.memory import InMemoryStateStore
from crossfed.server.state.records import (
    ClientRecord,
    EventRecord,
    RoundRecord,
    RunRecord,
    UploadRecord,
)
from crossfed.server.state.sqlite import SqliteStateStore

__all__ = [
    "ClientRecord",
    "EventRecord",
    "InMemoryStateStore",
    "RoundRecord",
    "RunRecord",
    "SqliteStateStore",
    "StateStore",
    "UploadRecord",
    "open_state_store",
]
