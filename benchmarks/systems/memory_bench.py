"""Server peak RSS growth during a round with N clients x a ~100 MB model: the server runs as
a subprocess; its idle VmRSS is read after startup, VmHWM is reset (clear_refs) and read again
after every client downloaded the model and uploaded an encrypted update."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from crossfed.common.wire.tensor_codec import encode_tensors
from crossfed.server.model_bootstrap import build_initial_model

from systems.measurement_records import (
    BenchmarkError,
    LoadSample,
    Measurement,
    Target,
    load_average,
    safe_ratio,
)
from systems.scripted_federation import UpdateSource, run_federation
from systems.server_process import ServerProcess, reset_peak_rss, start_server_process
from systems.sized_model import model_for_bytes

MEMORY_TARGET = Target("ratio", "<=", 3.0)
KiB = 1024


@dataclass(frozen=True)
class MemorySettings:
    """Fleet sizes and model size; one round per fleet."""

    client_counts: Sequence[int] = (2, 50)
    model_bytes: int = 100_000_000
    chunk_size: int = 1024 * 1024
    settle_s: float = 2.0
    timeout_s: float = 1500.0


class _RssSampler:
    """Polls VmRSS every ``interval_s`` (a cross-check where clear_refs is not permitted)."""

    def __init__(self, server: ServerProcess, interval_s: float = 0.1) -> None:
        self.server = server
        self.interval_s = interval_s
        self.max_kib = 0
        self.timeline: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._stop.wait(self.interval_s):
            try:
                rss = self.server.rss_kib()
            except BenchmarkError:
                return
            self.max_kib = max(self.max_kib, rss)
            self.timeline.append((time.perf_counter() - start, rss))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def measure_one(clients: int, settings: MemorySettings, advance: Callable[[], None]) -> Measurement:
    """Peak RSS growth of the server over its idle RSS, in units of the model size."""
    before = load_average()
    sized = model_for_bytes(settings.model_bytes)
    update = UpdateSource(
        encode_tensors(build_initial_model(sized.config).state), settings.chunk_size
    )
    config = {
        "model": sized.config.model_dump(),
        "rounds": {"rounds": 1, "min_clients": clients, "round_deadline_s": settings.timeout_s},
        "tls": {"insecure": True},
        "transport": {"chunk_size": settings.chunk_size},
    }
    with tempfile.TemporaryDirectory(prefix="crossfed-bench-mem-") as work:
        server = start_server_process(
            Path(work), config, ["--insecure", "--client-timeout-s", str(settings.timeout_s)]
        )
        try:
            time.sleep(settings.settle_s)
            idle_kib = server.rss_kib()
            idle_peak_kib = server.peak_kib()
            reset_ok = reset_peak_rss(server.pid)
            with _RssSampler(server) as sampler:
                result = run_federation(
                    server.target, clients, update, settings.timeout_s, lambda _r: advance()
                )
            # RSS first: VmHWM read after it is >= it (the other order raced a server still
            # settling after the round: a later RSS above an earlier high-water mark)
            end_kib = server.rss_kib()
            peak_kib = server.peak_kib()
        finally:
            server.stop()
    if result.errors:
        raise BenchmarkError(f"{len(result.errors)} client(s) failed: {result.errors[0]}")
    if not result.commit_times():
        raise BenchmarkError("the round did not commit")
    if not reset_ok:  # VmHWM still holds the startup peak: use the sampled maximum instead
        peak_kib = max(sampler.max_kib, end_kib)
    growth = (peak_kib - idle_kib) * KiB
    model_mb = sized.state_bytes / 1e6
    return Measurement(
        key=f"server_peak_rss_{clients}_clients",
        title=f"Server peak RSS growth, {clients} clients x {model_mb:.0f} MB model",
        value=growth / 1e6,
        unit="MB",
        baseline=model_mb,
        baseline_unit="MB",
        baseline_label="model size (the idle server's RSS is subtracted)",
        ratio=safe_ratio(growth, sized.state_bytes),
        ratio_definition="(server VmHWM during the round - idle VmRSS) / model bytes",
        target=MEMORY_TARGET,
        load=LoadSample(before, load_average()),
        samples=[growth / 1e6],
        baseline_samples=[model_mb],
        details={
            "clients": clients,
            "model_bytes": sized.state_bytes,
            "hidden_dim": sized.config.hidden_dim,
            "idle_rss_mb": idle_kib * KiB / 1e6,
            "startup_peak_mb": idle_peak_kib * KiB / 1e6,
            "round_peak_mb": peak_kib * KiB / 1e6,
            "sampled_max_rss_mb": sampler.max_kib * KiB / 1e6,
            "rss_after_round_mb": end_kib * KiB / 1e6,
            "peak_source": "VmHWM after clear_refs" if reset_ok else "sampled VmRSS (0.1 s)",
            "round_wall_s": result.wall_s,
            "client_retries": sum(c.retries for c in result.clients),
            "upload": "encrypted (AES-GCM per chunk)",
            "rss_timeline_s_mb": [(round(t, 2), kib * KiB / 1e6) for t, kib in sampler.timeline],
        },
    )


def measure_memory(
    settings: MemorySettings, advance: Callable[[], None] = lambda: None
) -> list[Measurement]:
    """One measurement per fleet size."""
    return [measure_one(n, settings, advance) for n in settings.client_counts]
