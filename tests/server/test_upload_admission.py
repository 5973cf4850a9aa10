"""Upload admission: a count of slots, and bytes admitted as chunks arrive within a budget
(the oldest upload never waits, so oversize uploads finish one after another), timeouts,
release of slot and bytes on error, and waiters admitted as room frees up."""

from __future__ import annotations

import threading

import pytest
from crossfed.server.errors import ConfigurationError
from crossfed.server.upload_admission import UploadAdmission


def test_bytes_are_admitted_as_they_arrive_within_the_budget() -> None:
    gate = UploadAdmission(max_uploads=4, max_bytes=100)
    with gate.slot(0.1) as first, gate.slot(0.1) as second:
        assert first is not None and second is not None
        assert gate.in_flight == (2, 0)  # a slot holds no bytes until its chunks come
        assert first.take(60, 0.0) and gate.in_flight == (2, 60)
        assert not second.take(50, 0.05)  # 60 + 50 > 100: the younger upload waits
        assert second.take(40, 0.0) and gate.in_flight == (2, 100)
        assert first.take(1000, 0.0)  # the oldest never waits: it may pass the budget
    assert gate.in_flight == (0, 0)


def test_count_limit_and_slot_timeout() -> None:
    gate = UploadAdmission(max_uploads=1, max_bytes=10)
    with gate.slot(0.05) as big:
        assert big is not None and big.take(1000, 0.0)
        with gate.slot(0.05) as other:
            assert other is None  # count limit 1
    with gate.slot(0.05) as again:
        assert again is not None


def test_a_younger_upload_waits_for_bytes_until_the_older_one_ends() -> None:
    gate = UploadAdmission(max_uploads=2, max_bytes=100)
    took = threading.Event()
    older_admitted = threading.Event()
    release_older = threading.Event()

    def older() -> None:
        with gate.slot(1.0) as slot:
            assert slot is not None and slot.take(90, 0.0)
            older_admitted.set()
            release_older.wait(10)

    thread = threading.Thread(target=older)
    thread.start()
    assert older_admitted.wait(10)
    with gate.slot(1.0) as younger:
        assert younger is not None
        waiter = threading.Thread(target=lambda: younger.take(50, 10.0) and took.set())
        waiter.start()
        assert not took.wait(0.1)  # no room while the older upload holds its 90 bytes
        release_older.set()
        assert took.wait(10)  # its release woke the waiter (now the oldest)
        waiter.join(10)
    thread.join(10)
    assert gate.in_flight == (0, 0)


def test_slot_and_bytes_released_on_error() -> None:
    gate = UploadAdmission(max_uploads=1, max_bytes=100)
    with pytest.raises(RuntimeError), gate.slot(0.1) as slot:
        assert slot is not None and slot.take(70, 0.0)
        raise RuntimeError("upload failed")
    assert gate.in_flight == (0, 0)


def test_invalid_limits_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="max_uploads"):
        UploadAdmission(0, 10)
