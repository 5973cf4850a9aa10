"""The abstract state-store interface the round engine talks to (no SQL, no I/O here)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from crossfed.server.state.records import (
    ClientRecord,
    EventRecord,
    RoundRecord,
    RunRecord,
    UploadRecord,
)


class StateStore(ABC):
    """Run, clients, round attempts, upload metadata and events of one run.

    Implementations must be safe to call from several threads; every method is atomic.
    """

    # -- run ---------------------------------------------------------------------------
    @abstractmethod
    def get_run(self) -> RunRecord | None:
        """The run record, or None for a fresh store."""

    @abstractmethod
    def put_run(self, run: RunRecord) -> None:
        """Create or replace the run record."""

    # -- clients -----------------------------------------------------------------------
    @abstractmethod
    def put_client(self, client: ClientRecord) -> None:
        """Create or replace a client record."""

    @abstractmethod
    def get_client(self, client_id: str) -> ClientRecord | None:
        """One client, or None if unknown."""

    @abstractmethod
    def list_clients(self) -> list[ClientRecord]:
        """All clients, ordered by client id."""

    # -- rounds ------------------------------------------------------------------------
    @abstractmethod
    def put_round(self, record: RoundRecord) -> None:
        """Create or replace a round attempt (keyed by round and attempt)."""

    @abstractmethod
    def get_round(self, round_no: int, attempt: int) -> RoundRecord | None:
        """One round attempt, or None."""

    @abstractmethod
    def list_rounds(self, limit: int = 0) -> list[RoundRecord]:
        """Round attempts, newest first; ``limit`` 0 means all."""

    @abstractmethod
    def commit_round(self, record: RoundRecord, run: RunRecord) -> None:
        """Atomically store a committed round attempt together with the advanced run record,
        so a crash never leaves a round committed without the run knowing (or vice versa)."""

    # -- uploads -----------------------------------------------------------------------
    @abstractmethod
    def add_upload(self, upload: UploadRecord) -> bool:
        """Record an accepted upload; False (and nothing stored) if the same client's
        upload_id is already recorded for the same round attempt (ids are per client)."""

    @abstractmethod
    def get_upload(
        self, round_no: int, attempt: int, client_id: str, upload_id: str
    ) -> UploadRecord | None:
        """The upload of ``client_id`` with this id in this round attempt, or None."""

    @abstractmethod
    def list_uploads(self, round_no: int, attempt: int) -> list[UploadRecord]:
        """Accepted uploads of one round attempt, in arrival order."""

    # -- events ------------------------------------------------------------------------
    @abstractmethod
    def append_event(
        self,
        kind: str,
        time_unix_s: float,
        round_no: int = 0,
        client_id: str = "",
        message: str = "",
        values: dict[str, float] | None = None,
    ) -> EventRecord:
        """Append an event; ids are strictly increasing and never reused."""

    @abstractmethod
    def events_after(self, after_event_id: int, limit: int = 1000) -> list[EventRecord]:
        """Events with id > after_event_id, oldest first."""

    # -- run settings ------------------------------------------------------------------
    @abstractmethod
    def get_setting(self, key: str) -> str | None:
        """A named setting the run pinned (e.g. the federation's encoders), or None."""

    @abstractmethod
    def put_setting(self, key: str, value: str) -> None:
        """Create or replace a named setting."""

    # -- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        """Release resources (database connection)."""
