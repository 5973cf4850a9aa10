"""Thread limits reach torch, and the peak-RSS probe sees an allocation and resets per round."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from crossfed.client.errors import ClientConfigError
from crossfed.client.resource_usage import limit_threads, peak_rss_bytes, reset_peak_rss


@pytest.mark.integration
def test_limit_threads_sets_intra_and_interop_threads() -> None:
    code = (
        "import torch; from crossfed.client.resource_usage import limit_threads; "
        "limit_threads(1); print(torch.get_num_threads(), torch.get_num_interop_threads())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]


def test_zero_threads_is_refused() -> None:
    with pytest.raises(ClientConfigError, match="--threads"):
        limit_threads(0)


def test_peak_rss_tracks_an_allocation_and_resets() -> None:
    if not reset_peak_rss():
        pytest.skip("kernel does not support resetting the RSS high-water mark")
    before = peak_rss_bytes()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    during = peak_rss_bytes()
    del block
    assert during - before >= 60 * 2**20
    assert reset_peak_rss()
    assert peak_rss_bytes() < during - 30 * 2**20
