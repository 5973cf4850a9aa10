"""Admission of uploads into the server: at most N in flight AND at most B payload bytes in
flight (each upload holds its reassembled payload, aliased by its decoded tensors, until it is
folded), so peak server memory stays a small multiple of the model size, not of the clients.

Bytes are admitted as they arrive, not as a header declares them: a header claiming 1 GiB
takes nothing until its chunks come. A chunk that does not fit waits for room; the oldest
upload in flight never waits (it may pass the budget alone), so uploads whose sizes add up to
more than the budget still all finish, one after another, instead of waiting on each other.

While a chunk waits for room the gate is *under pressure*: ``on_pressure`` runs (the servicer
drops its idle warm reassembly buffers) and the servicer's pool keeps no finished upload's
buffer warm, so the resident reassembly memory stays within the budget (plus the oldest).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from crossfed.common.wire.chunk_stream import BufferPool
from crossfed.server.errors import ConfigurationError


class UploadSlot:
    """One admitted upload: takes bytes as its chunks arrive; all returned when it ends."""

    def __init__(self, gate: UploadAdmission, order: int) -> None:
        self._gate = gate
        self.order = order
        self.bytes = 0
        self.credit = 0  # bytes paid ahead (a warm buffer), used up by the next chunks

    def take(self, size: int, timeout_s: float) -> bool:
        """Admit ``size`` more bytes, waiting up to ``timeout_s`` for room; False if none."""
        paid = min(size, self.credit)
        self.credit -= paid
        return paid == size or self._gate._take(self, size - paid, timeout_s)

    def prepay(self, size: int) -> bool:
        """Admit ``size`` bytes ahead of their chunks if they fit now (no wait); False if not."""
        return self._gate._prepay(self, size)

    def refund(self) -> None:
        """Give back what was paid ahead and not used."""
        self._gate._refund(self)


class SlotBuffers:
    """The reassembly buffer of one admitted upload. A warm pooled buffer is resident in full
    at once, so the slot pays for all of it up front (then nothing per chunk) and takes one
    only if that fits now; a fresh buffer becomes resident as chunks fill it, paid as they come."""

    def __init__(self, pool: BufferPool, slot: UploadSlot) -> None:
        self._pool = pool
        self._slot = slot

    def take(self, size: int) -> torch.Tensor:
        if self._slot.prepay(size):
            warm = self._pool.take_warm(size)
            if warm is not None:
                return warm
            self._slot.refund()
        return self._pool.take_fresh(size)


class UploadAdmission:
    """Counting + byte-budget gate over `UploadSlot`s."""

    def __init__(
        self, max_uploads: int, max_bytes: int, on_pressure: Callable[[], None] = lambda: None
    ) -> None:
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
        self._waiting = 0  # chunks waiting for room now
        self._on_pressure = on_pressure

    @property
    def under_pressure(self) -> bool:
        """Whether a chunk is waiting for room (read without the lock: a hint, never a gate)."""
        return self._waiting > 0

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
            if self._fits(slot, size):
                self._charge(slot, size)
                return True
            self._waiting += 1
        try:
            self._on_pressure()  # outside the gate's lock: the pool takes a lock of its own
            with self._changed:
                while not self._fits(slot, size):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._changed.wait(left)
                self._charge(slot, size)
                return True
        finally:
            with self._changed:
                self._waiting -= 1

    def _prepay(self, slot: UploadSlot, size: int) -> bool:
        with self._changed:
            if not self._fits(slot, size):
                return False
            self._charge(slot, size)
            slot.credit += size
            return True

    def _refund(self, slot: UploadSlot) -> None:
        with self._changed:
            slot.bytes -= slot.credit
            self._bytes -= slot.credit
            slot.credit = 0
            self._changed.notify_all()

    def _charge(self, slot: UploadSlot, size: int) -> None:
        slot.bytes += size
        self._bytes += size
