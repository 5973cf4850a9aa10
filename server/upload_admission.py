"""Admission of uploads into the server: at most N in flight AND at most B payload bytes in
flight (each upload holds its reassembled payload, aliased by its decoded tensors, until it is
folded), so peak server memory stays a small multiple of the model size, not of the clients.

Bytes are admitted as they arrive, not as a header declares them: a header claiming 1 GiB
takes nothing until its chunks come. A chunk that does not fit waits for room; the oldest
upload in flight never waits (it may pass the budget alone), so uploads whose sizes add up to
more than the budget still all finish, one after another, instead of waiting on each other.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from crossfed.server.errors import ConfigurationError


class UploadSlot:
    """One admitted upload: takes bytes as its chunks arrive; all returned when it ends."""

    def __init__(self, gate: UploadAdmission, order: int) -> None:
        self._gate = gate
        self.order = order
        self.bytes = 0

    def take(self, size: int, timeout_s: float) -> bool:
        """Admit ``size`` more bytes, waiting up to ``timeout_s`` for room; False if none."""
        return self._gate._take(self, size, timeout_s)


class UploadAdmission:
    """Counting + byte-budget gate over `UploadSlot`s."""

    def __init__(self, max_uploads: int, max_bytes: int) -> None:
        if max_uploads < 1 or max_bytes < 1:
            raise ConfigurationError(
                f"upload admission needs max_uploads >= 1 and max_bytes >= 1, got "
                f"{max_uploads} and {max_bytes}"
            )
        self.max_uploads = max_uploads
        self.max_bytes = max_bytes
        self._slots: dict[int, UploadSlot] = {}  # admission order -> slot
        self._bytes = 0
        self._order = itertools.count()
        self._changed = threading.Condition()

    @property
    def in_flight(self) -> tuple[int, int]:
        """(uploads, payload bytes) admitted and not yet released."""
        with self._changed:
            return len(self._slots), self._bytes

    @contextmanager
    def slot(self, timeout_s: float) -> Iterator[UploadSlot | None]:
        """Yield a slot once fewer than ``max_uploads`` are in flight (released on exit, with
        its bytes), or None if none frees up within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        admitted: UploadSlot | None = None
        with self._changed:
            while len(self._slots) >= self.max_uploads:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            if len(self._slots) < self.max_uploads:
                admitted = UploadSlot(self, next(self._order))
                self._slots[admitted.order] = admitted
        try:
            yield admitted
        finally:
            if admitted is not None:
                with self._changed:
                    del self._slots[admitted.order]
                    self._bytes -= admitted.bytes
                    self._changed.notify_all()

    def _fits(self, slot: UploadSlot, size: int) -> bool:
        oldest = min(self._slots) == slot.order
        return oldest or self._bytes + size <= self.max_bytes

    def _take(self, slot: UploadSlot, size: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not self._fits(slot, size):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            slot.bytes += size
            self._bytes += size
            return True
