"""The replay cache's memory across server restarts: every accepted (client, nonce) is
appended to a journal file before the request runs, and a restarted server loads the entries
still inside the clock window, so a request signed and used before a restart is refused after
it. Appends are single unbuffered writes (a killed process loses none; the file is fsynced
about once a second against power loss); the file is rewritten with only the live entries
when it has grown well past them.

Line format: ``<client_id> <nonce> <timestamp_ms> <expires_unix_s>``; a torn last line (a
crash mid-write) is skipped.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from crossfed.common.crypto.secure_files import SecureFileError, write_secret_file

_LINE = re.compile(r"^([A-Za-z0-9._-]{1,63}) ([0-9a-f]{32}) (\d{1,16}) (\d+(?:\.\d+)?)$")
_SYNC_EVERY_S = 1.0
#: Rewrite the journal once it holds this many more lines than live entries (and 4x as many).
_COMPACT_SLACK = 10_000


class NonceJournalError(OSError):
    """The journal cannot be read or written (the server must not run without it)."""


@dataclass(frozen=True)
class JournalEntry:
    """One accepted request's nonce and until when it must be remembered."""

    client_id: str
    nonce: str
    timestamp_ms: int
    expires_at: float


class NonceJournal:
    """Append-only file of accepted nonces (see module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._lines = 0
        self._synced = time.monotonic()

    def load(self, now: float) -> Iterator[JournalEntry]:
        """The entries not yet expired at ``now``, in file order."""
        try:
            text = self.path.read_text("ascii", errors="replace") if self.path.exists() else ""
        except OSError as exc:
            raise NonceJournalError(f"cannot read the nonce journal {self.path}: {exc}") from exc
        for line in text.splitlines():
            self._lines += 1
            match = _LINE.match(line)
            if match is None:
                continue  # a torn write of a killed process
            entry = JournalEntry(match[1], match[2], int(match[3]), float(match[4]))
            if entry.expires_at >= now:
                yield entry

    def append(self, entry: JournalEntry) -> None:
        """Record one accepted nonce (one write; fsync at most once a second)."""
        line = _line(entry)
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.write(self._fd, line.encode("ascii"))
            if time.monotonic() - self._synced >= _SYNC_EVERY_S:
                os.fsync(self._fd)
                self._synced = time.monotonic()
        except OSError as exc:
            raise NonceJournalError(f"cannot write the nonce journal {self.path}: {exc}") from exc
        self._lines += 1

    def needs_compaction(self, live: int) -> bool:
        """Whether the file has grown well past the ``live`` entries it must keep."""
        return self._lines > max(4 * live, live + _COMPACT_SLACK)

    def compact(self, live: Iterable[JournalEntry]) -> None:
        """Rewrite the file with only ``live`` entries (atomically: temp file, rename)."""
        lines = [_line(e) for e in live]
        self.close()
        try:
            write_secret_file(self.path, "".join(lines).encode("ascii"))
        except (OSError, SecureFileError) as exc:
            raise NonceJournalError(f"cannot compact the nonce journal {self.path}: {exc}") from exc
        self._lines = len(lines)

    def close(self) -> None:
        """Flush and close the file (the next append reopens it)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _line(entry: JournalEntry) -> str:
    return f"{entry.client_id} {entry.nonce} {entry.timestamp_ms} {entry.expires_at:.3f}\n"
