"""Upload admission: a count of slots, and bytes admitted as chunks arrive within a budget
(the oldest upload never waits, so oversize uploads finish one after another), timeouts,
release of slot and bytes on error, and waiters admitted as room frees up."""

from __future__ import annotations

import threading

import pytest
from crossfed.common.wire.chunk_stream import HUGE_PAGE_BUFFER_MIN_BYTES, BufferPool
from crossfed.server.errors import ConfigurationError
from crossfed.server.upload_admission import SlotBuffers, UploadAdmission


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


def test_a_paid_ahead_upload_uses_its_credit_and_gets_back_what_it_did_not_use() -> None:
    gate = UploadAdmission(max_uploads=4, max_bytes=100)
    with gate.slot(0.1) as first, gate.slot(0.1) as second:
        assert first is not None and second is not None
        assert first.take(10, 0.0)
        assert second.prepay(80) and gate.in_flight == (2, 90)
        assert second.take(50, 0.0) and second.take(30, 0.0)  # paid: nothing more charged
        assert gate.in_flight == (2, 90) and second.credit == 0
        assert not second.prepay(20)  # 90 + 20 > 100 and it is not the oldest: no charge
        assert gate.in_flight == (2, 90)
        assert first.prepay(40) and gate.in_flight == (2, 130)  # the oldest always fits
        first.refund()
        assert gate.in_flight == (2, 90) and first.credit == 0


def test_a_waiting_chunk_puts_the_gate_under_pressure_and_drops_warm_buffers() -> None:
    pool = BufferPool(max_idle=2, idle_s=60.0)
    pressured = threading.Event()

    def on_pressure() -> None:
        pool.clear()
        pressured.set()

    gate = UploadAdmission(max_uploads=2, max_bytes=100, on_pressure=on_pressure)
    pool.keep_idle = lambda: not gate.under_pressure
    size = HUGE_PAGE_BUFFER_MIN_BYTES
    pool.take(size)  # dropped at once: given back while nobody waits, so kept warm
    assert len(pool._idle) == 1
    waiting, done = threading.Event(), threading.Event()
    older_admission, younger_admission = gate.slot(1.0), gate.slot(1.0)
    older = older_admission.__enter__()
    younger = younger_admission.__enter__()
    assert older is not None and younger is not None and older.take(100, 0.0)

    def wait_for_room() -> None:
        waiting.set()
        if younger.take(10, 10.0):
            done.set()

    thread = threading.Thread(target=wait_for_room)
    thread.start()
    assert waiting.wait(10) and pressured.wait(10)
    assert gate.under_pressure and not pool._idle  # on_pressure dropped the idle buffer
    pool.take(size)  # a buffer finished under pressure is not kept either
    assert not pool._idle and pool.reused == 0
    assert not done.is_set()
    older_admission.__exit__(None, None, None)  # its bytes free: the waiter goes on
    thread.join(10)
    younger_admission.__exit__(None, None, None)
    assert done.is_set() and not gate.under_pressure


def test_slot_buffers_take_a_warm_buffer_only_when_it_is_paid_in_full() -> None:
    size = HUGE_PAGE_BUFFER_MIN_BYTES
    pool = BufferPool(max_idle=2, idle_s=60.0)
    pool.take(size)  # given back at once: one warm buffer waits
    gate = UploadAdmission(max_uploads=2, max_bytes=size + size // 2)
    with gate.slot(0.1) as older, gate.slot(0.1) as younger:
        assert older is not None and younger is not None and older.take(size, 0.0)
        fresh = SlotBuffers(pool, younger).take(size)  # size more would pass the budget
        assert pool.reused == 0 and younger.credit == 0 and gate.in_flight == (2, size)
        del fresh
    with gate.slot(0.1) as alone:
        assert alone is not None
        warm = SlotBuffers(pool, alone).take(size)
        assert pool.reused == 1 and alone.credit == size and gate.in_flight == (1, size)
        del warm
