"""Admission of uploads into the server: at most N in flight AND at most B payload bytes in
flight (each upload holds its reassembled payload, aliased by its decoded tensors, until it is
folded), so peak server memory stays a small multiple of the model size, not of the clients.
An upload larger than the byte budget is admitted alone."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from crossfed.server.errors import ConfigurationError


class UploadAdmission:
    """Counting + byte-budget gate; ``admit`` waits up to a timeout for room."""

    def __init__(self, max_uploads: int, max_bytes: int) -> None:
        if max_uploads < 1 or max_bytes < 1:
            raise ConfigurationError(
                f"upload admission needs max_uploads >= 1 and max_bytes >= 1, got "
                f"{max_uploads} and {max_bytes}"
            )
        self.max_uploads = max_uploads
        self.max_bytes = max_bytes
        self._uploads = 0
        self._bytes = 0
        self._changed = threading.Condition()

    @property
    def in_flight(self) -> tuple[int, int]:
        """(uploads, payload bytes) admitted and not yet released."""
        with self._changed:
            return self._uploads, self._bytes

    def _fits(self, size: int) -> bool:
        if self._uploads == 0:
            return True  # always let one through, however large (it was size-checked already)
        return self._uploads < self.max_uploads and self._bytes + size <= self.max_bytes

    @contextmanager
    def admit(self, size: int, timeout_s: float) -> Iterator[bool]:
        """Yield True once admitted (released on exit), False if no room within the timeout."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not self._fits(size):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            admitted = self._fits(size)
            if admitted:
                self._uploads += 1
                self._bytes += size
        try:
            yield admitted
        finally:
            if admitted:
                with self._changed:
                    self._uploads -= 1
                    self._bytes -= size
                    self._changed.notify_all()
