"""Upload streams in flight, watched: one per client, and none that stops sending.

A client holds at most one upload stream: a newer one from the same client cancels the older
(a retry after a dropped connection must not wait for the dead stream to time out, and a
client cannot take several slots). A stream that delivers no chunk for ``idle_timeout_s`` is
cancelled, so its slot, its bytes and its worker thread come back: a header followed by
silence cannot hold the server's upload capacity. A watchdog thread runs while streams exist.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from crossfed.server.errors import ServerBusyError

Clock = Callable[[], float]
#: How long a new stream waits for the cancelled older stream of its client to leave.
SUPERSEDE_WAIT_S = 10.0


@dataclass
class StreamWatch:
    """One tracked stream: who sends it, how to cancel it, when it last made progress."""

    client_id: str
    round_no: int
    cancel: Callable[[], None]
    last_progress: float
    cancelled: str = ""  # why it was cancelled ("" while it runs)
    _clock: Clock = field(default=time.monotonic, repr=False)

    def touch(self) -> None:
        """The stream delivered something: its idle time starts again."""
        self.last_progress = self._clock()


class UploadStreams:
    """The registry of upload streams in flight and their idle watchdog."""

    def __init__(
        self,
        idle_timeout_s: float,
        on_cancel: Callable[[StreamWatch], None] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if not idle_timeout_s > 0:
            raise ValueError(f"idle_timeout_s must be > 0, got {idle_timeout_s}")
        self.idle_timeout_s = idle_timeout_s
        self.on_cancel = on_cancel
        self.clock = clock
        self._streams: dict[str, StreamWatch] = {}
        self._changed = threading.Condition()
        self._watchdog: threading.Thread | None = None

    def __len__(self) -> int:
        with self._changed:
            return len(self._streams)

    @contextmanager
    def track(
        self, client_id: str, round_no: int, cancel: Callable[[], None]
    ) -> Iterator[StreamWatch]:
        """Register a stream of ``client_id`` for the duration of the block; an older stream
        of the same client is cancelled first (`ServerBusyError` if it does not leave)."""
        watch = StreamWatch(client_id, round_no, cancel, self.clock(), _clock=self.clock)
        deadline = time.monotonic() + SUPERSEDE_WAIT_S
        with self._changed:
            # until this client has no stream: cancel the one it has and wait for it to
            # leave (another new stream of the client may have taken its place meanwhile)
            while (older := self._streams.get(client_id)) is not None:
                self._cancel_locked(older, "superseded by a newer upload of the same client")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServerBusyError(
                        f"an earlier upload of {client_id!r} is still being processed; "
                        "retry shortly"
                    )
                self._changed.wait(left)
            self._streams[client_id] = watch
            self._ensure_watchdog_locked()
        try:
            yield watch
        finally:
            with self._changed:
                if self._streams.get(client_id) is watch:
                    del self._streams[client_id]
                self._changed.notify_all()

    def sweep(self) -> list[StreamWatch]:
        """Cancel every stream idle for longer than the timeout; returns them."""
        now = self.clock()
        with self._changed:
            stalled = [
                w
                for w in self._streams.values()
                if not w.cancelled and now - w.last_progress > self.idle_timeout_s
            ]
            for watch in stalled:
                self._cancel_locked(
                    watch,
                    f"sent nothing for {now - watch.last_progress:.0f} s "
                    f"(transport.upload_idle_timeout_s = {self.idle_timeout_s:g})",
                )
        if self.on_cancel is not None:
            for watch in stalled:
                self.on_cancel(watch)
        return stalled

    def _cancel_locked(self, watch: StreamWatch, why: str) -> None:
        if not watch.cancelled:
            watch.cancelled = why
            watch.cancel()

    def _ensure_watchdog_locked(self) -> None:
        if self._watchdog is None or not self._watchdog.is_alive():
            self._watchdog = threading.Thread(
                target=self._watch, name="crossfed-upload-watchdog", daemon=True
            )
            self._watchdog.start()

    def _watch(self) -> None:
        """Sweep while streams exist (the thread ends with the last one)."""
        period = min(1.0, self.idle_timeout_s / 4)
        while True:
            with self._changed:
                if not self._streams:
                    self._watchdog = None
                    return
                self._changed.wait(period)
            self.sweep()
