"""Coordination overhead per round: a real server subprocess, a tiny model and N scripted
no-op clients (2, 10, 50); seconds between consecutive round commits, against the RPC floor
(the time one client's heartbeat + download + upload calls themselves take in that run)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from crossfed.common.model.model_config import ModelConfig
from crossfed.common.wire.tensor_codec import encode_tensors
from crossfed.server.model_bootstrap import build_initial_model

from systems.measurement_records import (
    BenchmarkError,
    LoadSample,
    Measurement,
    Target,
    load_average,
    median,
    safe_ratio,
)
from systems.scripted_federation import UpdateSource, run_federation
from systems.server_process import start_server_process
from systems.sized_model import TINY_MODEL

COORDINATION_TARGET = Target("value", "<=", 0.5)
TARGET_CLIENTS = 10  # the target is stated at 10 clients


@dataclass(frozen=True)
class CoordinationSettings:
    """Fleet sizes and rounds per fleet (the first round, with registration, is not timed)."""

    client_counts: Sequence[int] = (2, 10, 50)
    rounds: int = 8
    server_flags: tuple[str, ...] = ()
    timeout_s: float = 600.0
    extra: dict[str, str] = field(default_factory=dict)


def _update_source(chunk_size: int) -> UpdateSource:
    state = build_initial_model(ModelConfig(**TINY_MODEL)).state  # type: ignore[arg-type]
    return UpdateSource(encode_tensors(state), chunk_size)


def measure_one(
    clients: int, settings: CoordinationSettings, advance: Callable[[], None]
) -> Measurement:
    """Seconds per round with ``clients`` scripted clients (median of the per-round gaps)."""
    if settings.rounds < 2:
        raise BenchmarkError("coordination needs >= 2 rounds (the first one is not timed)")
    before = load_average()
    config = {
        "model": dict(TINY_MODEL),
        "rounds": {
            "rounds": settings.rounds,
            "min_clients": clients,
            "round_deadline_s": 120.0,
        },
        "tls": {"insecure": True},
    }
    update = _update_source(1024 * 1024)
    with tempfile.TemporaryDirectory(prefix="crossfed-bench-coord-") as work:
        server = start_server_process(Path(work), config, ["--insecure", *settings.server_flags])
        try:
            result = run_federation(
                server.target, clients, update, settings.timeout_s, lambda _r: advance()
            )
        finally:
            server.stop()
        if result.errors:
            raise BenchmarkError(f"{len(result.errors)} client(s) failed: {result.errors[0]}")
    commits = result.commit_times()
    rounds = sorted(commits)
    if len(rounds) != settings.rounds:
        raise BenchmarkError(f"only rounds {rounds} committed of {settings.rounds}")
    gaps = [commits[r] - commits[r - 1] for r in rounds[1:]]
    timed = [t for t in result.all_timings() if t.round >= 2]
    floors = [t.heartbeat_s + t.download_s + t.upload_s for t in timed]
    # from the commit of round r-1 until the last client heard TRAIN for round r
    discover = []
    for r in rounds[1:]:
        seen = [t.train_seen_at for t in timed if t.round == r]
        discover.append(max(seen) - commits[r - 1])
    heartbeats = sum(c.heartbeats for c in result.clients)
    value, floor = median(gaps), median(floors)
    return Measurement(
        key=f"coordination_{clients}_clients",
        title=f"Coordination overhead per round, {clients} clients",
        value=value,
        unit="s/round",
        baseline=floor,
        baseline_unit="s",
        baseline_label="RPC floor: one client's heartbeat + download + upload calls",
        ratio=safe_ratio(value, floor),
        ratio_definition="seconds per round / RPC floor (1.0 = no coordination idle time)",
        target=COORDINATION_TARGET if clients == TARGET_CLIENTS else None,
        load=LoadSample(before, load_average()),
        samples=gaps,
        baseline_samples=floors,
        details={
            "clients": clients,
            "rounds": settings.rounds,
            "timed_rounds": len(gaps),
            "median_discover_s": median(discover),
            "heartbeats_per_client_round": heartbeats / max(1, clients * settings.rounds),
            "retries": sum(c.retries for c in result.clients),
            "server_flags": list(settings.server_flags),
            "model_bytes": len(update.payload),
        },
    )


def measure_coordination(
    settings: CoordinationSettings, advance: Callable[[], None] = lambda: None
) -> list[Measurement]:
    """One measurement per fleet size."""
    return [measure_one(n, settings, advance) for n in settings.client_counts]
