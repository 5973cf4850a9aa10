"""Upload admission: count and byte budget, oversize uploads run alone, timeouts, release on
error, and waiters admitted as room frees up."""

from __future__ import annotations

import threading
import time

import pytest
from crossfed.server.errors import ConfigurationError
from crossfed.server.upload_admission import UploadAdmission


def test_byte_budget_blocks_until_room_then_admits() -> None:
    gate = UploadAdmission(max_uploads=4, max_bytes=100)
    with gate.admit(60, 0.1) as first:
        assert first
        with gate.admit(50, 0.05) as second:
            assert not second  # 60 + 50 > 100
        with gate.admit(40, 0.05) as third:
            assert third and gate.in_flight == (2, 100)
    assert gate.in_flight == (0, 0)


def test_count_limit_and_oversize_upload_admitted_alone() -> None:
    gate = UploadAdmission(max_uploads=1, max_bytes=10)
    with gate.admit(1000, 0.05) as big:
        assert big  # larger than the budget, but nothing else is in flight
        with gate.admit(1, 0.05) as small:
            assert not small  # count limit 1
    with gate.admit(1, 0.05) as small:
        assert small


def test_slot_released_on_error_and_waiter_wakes() -> None:
    gate = UploadAdmission(max_uploads=1, max_bytes=100)
    with pytest.raises(RuntimeError), gate.admit(10, 0.1):
        raise RuntimeError("upload failed")
    assert gate.in_flight == (0, 0)
    got: list[bool] = []
    with gate.admit(10, 0.1):
        waiter = threading.Thread(target=lambda: got.append(_admit_once(gate)))
        waiter.start()
        time.sleep(0.1)
        assert got == []  # still waiting for the slot
    waiter.join(5)
    assert got == [True]


def _admit_once(gate: UploadAdmission) -> bool:
    with gate.admit(10, 5.0) as admitted:
        return admitted


def test_invalid_limits_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="max_uploads"):
        UploadAdmission(0, 10)
