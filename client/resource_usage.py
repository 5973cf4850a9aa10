"""Edge-device resource knobs and probes: CPU thread limits for torch, and the process's peak
resident memory (resettable per round on Linux, so each round reports its own peak)."""

from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path

import torch
from crossfed.client.errors import ClientConfigError

log = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def limit_threads(threads: int | None) -> None:
    """Use at most ``threads`` CPU threads for torch intra- and inter-op work (None: default).

    Inter-op threads can only be set before torch starts parallel work; if that has already
    happened the intra-op limit still applies and a warning says so.
    """
    if threads is None:
        return
    if threads < 1:
        raise ClientConfigError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError as exc:
        log.warning("inter-op thread count already fixed (%s); intra-op set to %d", exc, threads)


def _read_status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_bytes() -> int | None:
    """Resident memory now (Linux), None where unknown."""
    kib = _read_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def private_rss_bytes() -> int | None:
    """Resident memory of this process's own (anonymous) pages (Linux), None where unknown:
    RSS without the shared pages it maps, such as a shared-memory object store's."""
    kib = _read_status_kib("RssAnon")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int:
    """High-water mark of resident memory since start or the last :func:`reset_peak_rss`."""
    kib = _read_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(usage if sys.platform == "darwin" else usage * 1024)


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux >= 4.0); False where unsupported,
    in which case :func:`peak_rss_bytes` keeps reporting the lifetime peak."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True
