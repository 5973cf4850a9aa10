"""Upload streams: one per client (a newer stream cancels the older, also when several new
ones race), and a stream idle past the timeout is cancelled by the sweep (injected clock)."""

from __future__ import annotations

import threading

import pytest
from crossfed.server.upload_streams import StreamWatch, UploadStreams


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_sweep_cancels_only_streams_idle_past_the_timeout() -> None:
    clock = Clock()
    reported: list[StreamWatch] = []
    streams = UploadStreams(10.0, reported.append, clock=clock)
    cancelled: list[str] = []
    with (
        streams.track("a", 1, lambda: cancelled.append("a")) as a,
        streams.track("b", 1, lambda: cancelled.append("b")),
    ):
        clock.now += 8
        a.touch()  # a delivered a chunk; b has been silent for 8 s
        clock.now += 3
        assert streams.sweep() == [reported[0]] and cancelled == ["b"]
        assert "sent nothing for 11 s" in reported[0].cancelled and not a.cancelled
        assert streams.sweep() == []  # cancelled once
    assert len(streams) == 0


def _hold(streams: UploadStreams, client: str, entered: threading.Event,
          cancelled: threading.Event, release: threading.Event) -> None:  # fmt: skip
    """Track one stream until the server cancels it (or the test releases it)."""
    with streams.track(client, 1, cancelled.set):
        entered.set()
        while not (cancelled.wait(0.01) or release.is_set()):
            pass


def test_a_newer_stream_of_a_client_replaces_the_older_even_when_several_race() -> None:
    streams = UploadStreams(600.0)
    release = threading.Event()
    holders = []
    for _ in range(4):
        entered, cancelled = threading.Event(), threading.Event()
        thread = threading.Thread(
            target=_hold, args=(streams, "a", entered, cancelled, release), daemon=True
        )
        holders.append((thread, entered, cancelled))
    first, *racers = holders
    first[0].start()
    assert first[1].wait(10)
    for thread, _, _ in racers:  # three newcomers at once
        thread.start()
    try:
        for _, entered, cancelled in racers:
            assert entered.wait(10) or cancelled.is_set()
        # exactly one stream of the client is left running; every other one was cancelled
        running = [h for h in holders if not h[2].is_set()]
        assert first[2].is_set() and len(running) == 1 and len(streams) == 1
    finally:
        release.set()
        for thread, _, _ in holders:
            thread.join(10)
    assert len(streams) == 0


def test_the_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="idle_timeout_s"):
        UploadStreams(0.0)
