"""The server's malloc settings: threshold sized to the chunk frame, applied once per process."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
from crossfed.server.malloc_tuning import (
    MAX_THRESHOLD_BYTES,
    MIN_THRESHOLD_BYTES,
    mmap_threshold_for,
)

MiB = 1024 * 1024


def test_threshold_is_twice_the_frame_within_glibc_range() -> None:
    assert mmap_threshold_for(MiB + 64 * 1024) == 2 * MiB + 128 * 1024
    assert mmap_threshold_for(1000) == MIN_THRESHOLD_BYTES
    assert mmap_threshold_for(100 * MiB) == MAX_THRESHOLD_BYTES


@pytest.mark.integration
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_first_call_wins_in_a_fresh_process() -> None:
    code = (
        "from crossfed.server.malloc_tuning import tune_server_malloc as t\n"
        "print(t(1024 * 1024), t(4 * 1024 * 1024))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(2 * MiB)] * 2
