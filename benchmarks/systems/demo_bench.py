"""`crossfed demo` wall time with its fastest settings (1 round, few samples, 1 epoch), run as
a subprocess twice: cold embedding cache, then warm; against `crossfed --help` (the CLI's own
start-up cost) measured in the same run."""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from systems.measurement_records import (
    BenchmarkError,
    LoadSample,
    Measurement,
    load_average,
    median,
    safe_ratio,
)
from systems.server_process import crossfed_command


@dataclass(frozen=True)
class DemoSettings:
    """The demo's fastest settings (flags of `crossfed demo`)."""

    rounds: int = 1
    clients: int = 3
    samples: int = 600
    epochs: int = 1
    timeout_s: float = 600.0
    help_repeats: int = 3


def demo_available() -> str | None:
    """None if `crossfed demo --help` works, else why not."""
    try:
        done = subprocess.run(
            [*crossfed_command(), "demo", "--help"], check=False, capture_output=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`crossfed demo --help` failed: {exc}"
    if done.returncode != 0:
        return f"`crossfed demo --help` exited {done.returncode}"
    return None


def _timed_run(command: list[str], timeout_s: float) -> float:
    started = time.perf_counter()
    try:
        done = subprocess.run(command, check=False, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise BenchmarkError(f"{' '.join(command[:3])} timed out after {timeout_s:g} s") from exc
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise BenchmarkError(f"`{' '.join(command)}` exited {done.returncode}: {' | '.join(tail)}")
    return elapsed


def measure_demo(settings: DemoSettings, advance: Callable[[], None] = lambda: None) -> Measurement:
    """Demo wall time with a warm embedding cache (the cold run is in the details)."""
    before = load_average()
    base = crossfed_command()
    helps = [_timed_run([*base, "--help"], 120) for _ in range(settings.help_repeats)]
    advance()
    with tempfile.TemporaryDirectory(prefix="crossfed-bench-demo-") as work:
        root = Path(work)

        def demo(run: str) -> float:
            return _timed_run(
                [
                    *base,
                    "demo",
                    "--rounds",
                    str(settings.rounds),
                    "--clients",
                    str(settings.clients),
                    "--samples",
                    str(settings.samples),
                    "--epochs",
                    str(settings.epochs),
                    "--run-dir",
                    str(root / run),
                    "--cache-dir",
                    str(root / "cache"),
                    "--timeout-s",
                    str(settings.timeout_s),
                    "--no-progress",
                ],
                settings.timeout_s + 60,
            )

        cold = demo("cold")
        advance()
        warm = demo("warm")
        advance()
    help_s = median(helps)
    return Measurement(
        key="demo_wall_time",
        title="`crossfed demo` wall time (fastest settings, warm embedding cache)",
        value=warm,
        unit="s",
        baseline=help_s,
        baseline_unit="s",
        baseline_label="`crossfed --help` (process start + CLI imports)",
        ratio=safe_ratio(warm, help_s),
        ratio_definition="demo seconds / `crossfed --help` seconds",
        target=None,
        load=LoadSample(before, load_average()),
        samples=[warm],
        baseline_samples=helps,
        details={
            "cold_cache_s": cold,
            "flags": f"--rounds {settings.rounds} --clients {settings.clients} --samples "
            f"{settings.samples} --epochs {settings.epochs} --no-progress",
        },
    )
