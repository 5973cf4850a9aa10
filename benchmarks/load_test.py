"""Load benchmark: N concurrent lightweight clients (grpc.aio, no training) against one real
`crossfed server` process on 127.0.0.1, each round every client downloads, exchanges
projections and uploads a known constant. Prints latency percentiles as ratios against a
single-client baseline measured in the same run, rounds/s, and the server's peak RSS; and
checks every upload was aggregated exactly once (exact weighted average in every checkpoint).

    .venv/bin/python benchmarks/load_test.py --clients 200 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "reliability"))

from load_clients import LoadStats, run_clients
from reliability_harness import (
    SMALL_MODEL,
    ServerProcess,
    free_port,
    verify_committed_history,
    write_server_config,
)


def _one_run(clients: int, rounds: int, timeout_s: float) -> tuple[LoadStats, float, float]:
    """(stats, seconds, server peak RSS MiB) of one federation with ``clients`` clients."""
    from crossfed.common.model.model_config import ModelConfig
    from crossfed.server.model_bootstrap import _standin_state

    root = Path(tempfile.mkdtemp(prefix="crossfed-load-"))
    config = write_server_config(
        root / "server.yaml", rounds=rounds, min_clients=clients, round_deadline_s=timeout_s
    )
    server = ServerProcess.start(
        root / "state",
        config,
        free_port(),
        extra_args=("--heartbeat-ms", "500", "--client-timeout-s", "120"),
    )
    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            try:
                peak[0] = max(peak[0], server.peak_rss_mib())
            except Exception:  # noqa: BLE001 - the process is exiting
                return

    try:
        server.wait_ready()
        threading.Thread(target=sample, daemon=True).start()
        started = time.monotonic()
        stats = asyncio.run(run_clients(server.target, clients, timeout_s))
        elapsed = time.monotonic() - started
        stop.set()
        server.wait_exit(60)
    finally:
        stop.set()
        server.kill()
    if stats.errors:
        raise SystemExit(f"load_test: clients failed: {stats.errors[:5]}")
    initial = _standin_state(ModelConfig(**SMALL_MODEL), 0)
    committed = verify_committed_history(root / "state", initial, lambda c: int(c[1:]))
    if committed != rounds:
        raise SystemExit(f"load_test: {committed} of {rounds} rounds committed")
    return stats, elapsed, peak[0]


def main(argv: list[str] | None = None) -> int:
    """Baseline (1 client) then the loaded run; print ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.clients < 2 or args.rounds < 1:
        parser.error("--clients must be >= 2 and --rounds >= 1")
    console = Console()
    show = console.is_terminal and not args.no_progress
    results = {}
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        disable=not show,
    ) as progress:
        for label, n in (("baseline", 1), ("load", args.clients)):
            task = progress.add_task(f"{label}: {n} client(s) x {args.rounds} rounds")
            results[label] = _one_run(n, args.rounds, args.timeout_s)
            progress.update(task, completed=1, total=1)
    (base, base_s, base_rss), (load, load_s, load_rss) = results["baseline"], results["load"]
    console.print(f"clients {args.clients} x rounds {args.rounds}: every upload aggregated once")
    console.print(
        f"rounds/s: baseline {args.rounds / base_s:.3f}, load "
        f"{args.rounds / load_s:.3f} (x{base_s / load_s:.2f})"
    )
    for rpc in ("Heartbeat", "DownloadGlobalModel", "ExchangeProjections", "UploadUpdate"):
        for q in (0.5, 0.99):
            b, v = base.percentile(rpc, q), load.percentile(rpc, q)
            console.print(
                f"{rpc:>20} p{int(q * 100):<2}: {1000 * v:8.1f} ms = "
                f"x{v / b:6.1f} the 1-client baseline ({1000 * b:.1f} ms)"
            )
    console.print(
        f"server peak RSS: {load_rss:.0f} MiB = x{load_rss / base_rss:.2f} baseline "
        f"({base_rss:.0f} MiB)"
    )
    console.print(f"retried under load: {dict(load.retried)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
