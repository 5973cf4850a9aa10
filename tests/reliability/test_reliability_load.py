"""Load: >= 200 concurrent lightweight clients (grpc.aio, one connection each, no training)
register, exchange projections and upload against one real server process on 127.0.0.1.
Every upload must be aggregated exactly once: each client uploads a known constant with a
distinct weight, so each committed checkpoint must equal the exact weighted average of all
200 (a lost or double-counted upload shifts it). Reports rounds/s, p50/p99 RPC latency and
the server's peak RSS (VmHWM)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from tests.support.ports import free_port
from tests.support.reliability.load_clients import LoadStats, run_clients
from tests.support.reliability.reliability_harness import (
    ServerProcess,
    record_result,
    rounds_of,
    uploads_of,
    verify_committed_history,
    write_server_config,
)
from tests.support.small_model import small_model_config
from tests.support.standin_model import standin_state

pytestmark = pytest.mark.integration  # starts real processes


def _run_load(root: Path, clients: int, rounds: int, timeout_s: float) -> dict[str, float]:
    state_dir = root / "state"
    config = write_server_config(root / "server.yaml", rounds=rounds, min_clients=clients,
                                 round_deadline_s=timeout_s)  # fmt: skip
    port = free_port()
    server = ServerProcess.start(
        state_dir, config, port, extra_args=("--heartbeat-ms", "500", "--client-timeout-s", "120")
    )
    peak = [0.0]
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.wait(0.2):
            try:
                peak[0] = max(peak[0], server.peak_rss_mib())
            except (OSError, Exception):  # noqa: BLE001 - the process may be exiting
                return

    try:
        server.wait_ready()
        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        started = time.monotonic()
        stats: LoadStats = asyncio.run(run_clients(server.target, clients, timeout_s))
        elapsed = time.monotonic() - started
        stop.set()
        sampler.join(timeout=5)
        code = server.wait_exit(timeout_s=60)
    finally:
        stop.set()
        server.kill()
    assert code == 0, server.log_tail()
    assert not stats.errors, stats.errors[:10]
    assert stats.done_clients == clients
    committed = [r for r in rounds_of(state_dir) if r.state == "committed"]
    assert [r.round for r in committed] == list(range(1, rounds + 1))
    for row in committed:  # every client's upload in every round, each exactly once
        ups = uploads_of(state_dir, row.round, row.attempt)
        assert row.received == clients and len({c for c, _, _ in ups}) == clients
    initial = standin_state(small_model_config(), 0)
    assert verify_committed_history(state_dir, initial, lambda c: int(c[1:])) == rounds
    everything = stats.all_latencies()
    return {
        "clients": clients,
        "rounds": rounds,
        "seconds": round(elapsed, 2),
        "rounds_per_s": round(rounds / elapsed, 3),
        "rpcs": len(everything),
        "rpc_p50_ms": round(1000 * everything[len(everything) // 2], 2),
        "rpc_p99_ms": round(1000 * everything[int(0.99 * len(everything))], 2),
        "upload_p50_ms": round(1000 * stats.percentile("UploadUpdate", 0.5), 2),
        "upload_p99_ms": round(1000 * stats.percentile("UploadUpdate", 0.99), 2),
        "heartbeat_p99_ms": round(1000 * stats.percentile("Heartbeat", 0.99), 2),
        "download_p99_ms": round(1000 * stats.percentile("DownloadGlobalModel", 0.99), 2),
        "server_peak_rss_mib": round(peak[0], 1),
        "uploads_accepted": stats.uploads_accepted,
        "duplicates": stats.duplicates,
        "retried": dict(stats.retried),  # type: ignore[dict-item]
        "host_load_1min": round(os.getloadavg()[0], 1),
    }


@pytest.mark.long  # over ~20 s on 2 cores: .ci/run's own stage
def test_200_clients_two_rounds_every_upload_once(tmp_path: Path) -> None:
    numbers = _run_load(tmp_path, clients=200, rounds=2, timeout_s=120)
    assert numbers["uploads_accepted"] == 400
    record_result("load_200x2", **numbers)


@pytest.mark.slow
def test_300_clients_five_rounds_every_upload_once(tmp_path: Path) -> None:
    numbers = _run_load(tmp_path, clients=300, rounds=5, timeout_s=400)
    assert numbers["uploads_accepted"] == 1500
    record_result("load_300x5", **numbers)
