"""Run the systems benchmark suite: FedAvg fold, encrypted upload/download through the real
server, coordination overhead per round, server peak memory, client encoding and training,
and `crossfed demo` wall time. Prints a markdown table, writes JSON, PNG plots and the Systems
section of BENCHMARKS.md.

    python benchmarks/systems/run_systems.py [--profile full|smoke] [--only transfer,memory]
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

_BENCHMARKS = Path(__file__).resolve().parents[1]
_REPO = _BENCHMARKS.parent
if str(_BENCHMARKS) not in sys.path:  # `systems.*` and the other engineers' benchmark scripts
    sys.path.insert(0, str(_BENCHMARKS))

from rich.console import Console
from rich.progress import Progress

from systems.measurement_records import (
    BenchmarkError,
    Measurement,
    SuiteRun,
    machine_info,
)

# "client" runs before "transfer": the in-process CoordinatorServer pins glibc's mmap threshold
# for the rest of this process (server/malloc_tuning.py), which would make every training
# activation a fresh mmap and measure the client under the server's allocator setting.
BENCHMARK_NAMES = ("fedavg", "client", "transfer", "coordination", "memory", "demo")


@dataclass(frozen=True)
class Profile:
    """Sizes for one run of the suite (``steps``: progress units per benchmark)."""

    name: str
    runners: dict[str, tuple[Callable[[Callable[[], None]], list[Measurement]], int]]
    skip: dict[str, str]


def _profiles(name: str) -> Profile:
    from systems.client_compute_bench import ClientComputeSettings, measure_client_compute
    from systems.coordination_bench import CoordinationSettings, measure_coordination
    from systems.demo_bench import DemoSettings, demo_available, measure_demo
    from systems.fedavg_bench import FedAvgSettings, measure_fedavg
    from systems.memory_bench import MemorySettings, measure_memory
    from systems.transfer_bench import TransferSettings, measure_transfer

    smoke = name == "smoke"
    fedavg = FedAvgSettings(model_mib=4, clients=2, repeats=2) if smoke else FedAvgSettings()
    transfer = TransferSettings(model_bytes=2_000_000, repeats=1) if smoke else TransferSettings()
    coordination = (
        CoordinationSettings(client_counts=(2,), rounds=2, timeout_s=60)
        if smoke
        else CoordinationSettings()
    )
    memory = (
        MemorySettings(client_counts=(2,), model_bytes=2_000_000, settle_s=0.2, timeout_s=60)
        if smoke
        else MemorySettings()
    )
    client = (
        ClientComputeSettings(
            num_samples=120,
            text_encoder="minilm",
            encode_repeats=1,
            epochs=1,
            train_repeats=1,
            large_batch_size=None,
            warmup=False,
        )
        if smoke
        else ClientComputeSettings()
    )
    demo = DemoSettings()
    runners: dict[str, tuple[Callable[[Callable[[], None]], list[Measurement]], int]] = {
        "fedavg": (lambda a: [measure_fedavg(fedavg, a)], fedavg.repeats),
        # deployment topology (server in its own process), then in-process for reference
        "transfer": (
            lambda a: [
                *measure_transfer(transfer, a),
                *measure_transfer(replace(transfer, separate_processes=False), a),
            ],
            2 * transfer.repeats,
        ),
        "coordination": (
            lambda a: measure_coordination(coordination, a),
            coordination.rounds * len(coordination.client_counts),
        ),
        "memory": (lambda a: measure_memory(memory, a), len(memory.client_counts)),
        "client": (
            lambda a: measure_client_compute(client, a),
            client.encode_repeats
            + client.train_repeats * (1 if client.large_batch_size is None else 2),
        ),
        "demo": (lambda a: [measure_demo(demo, a)], 3),
    }
    skip: dict[str, str] = {}
    if smoke:
        skip["demo"] = "not in the smoke profile (a full federated run takes minutes)"
    else:
        why = demo_available()
        if why is not None:
            skip["demo"] = why
    return Profile(name, runners, skip)


def run_suite(
    profile: Profile,
    only: list[str],
    progress: bool,
    console: Console,
    checkpoint: Callable[[SuiteRun], None] = lambda run: None,
) -> SuiteRun:
    """Run the selected benchmarks; a failing one is recorded and the rest still run.
    ``checkpoint`` sees the partial run after each benchmark (long runs write JSON early)."""
    run = SuiteRun(profile.name, time.time(), machine_info())
    selected = [n for n in BENCHMARK_NAMES if n in only]
    with Progress(console=console, disable=not progress, transient=True) as bar:
        overall = bar.add_task("systems suite", total=len(selected))
        for name in selected:
            if name in profile.skip:
                run.skipped[name] = profile.skip[name]
                bar.advance(overall)
                continue
            runner, steps = profile.runners[name]
            task = bar.add_task(name, total=steps)
            started = time.perf_counter()
            try:
                found = runner(lambda t=task: bar.advance(t))  # type: ignore[misc]
            except BenchmarkError as exc:
                run.failures[name] = str(exc)
            except Exception as exc:  # noqa: BLE001 -- one broken benchmark must not hide the rest
                run.failures[name] = f"{type(exc).__name__}: {exc}"
            else:
                run.measurements.extend(found)
            console.log(f"{name}: done in {time.perf_counter() - started:.1f} s")
            checkpoint(run)
            bar.remove_task(task)
            bar.advance(overall)
    run.finished_unix_s = time.time()
    return run


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit status 0 even when a target is missed (the report says so), 1
    when a benchmark failed to produce its numbers, 2 on bad options."""
    from systems.report_writer import (
        ReportError,
        markdown_table,
        section_markdown,
        write_json,
        write_plots,
        write_section,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--profile", choices=("full", "smoke"), default="full")
    parser.add_argument(
        "--only", default=",".join(BENCHMARK_NAMES), help=f"subset of {','.join(BENCHMARK_NAMES)}"
    )
    results = _BENCHMARKS / "results"
    parser.add_argument("--json", type=Path, default=results / "systems.json")
    parser.add_argument("--plots-dir", type=Path, default=results)
    parser.add_argument(
        "--markdown", type=Path, default=_REPO / "BENCHMARKS.md", help="file with the section"
    )
    parser.add_argument("--no-markdown", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: re-render table, plots and markdown from --json",
    )
    args = parser.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(only) - set(BENCHMARK_NAMES))
    if unknown or not only:
        parser.error(f"--only: unknown benchmark(s) {unknown}; choose from {BENCHMARK_NAMES}")

    # the benchmarks run insecure loopback servers on purpose; keep their warnings out
    logging.getLogger("crossfed").setLevel(logging.ERROR)
    console = Console(stderr=True)
    show = not args.no_progress and sys.stderr.isatty()
    if args.render_only:
        try:
            run = SuiteRun.from_json(json.loads(args.json.read_text()))
        except (OSError, ValueError, KeyError, TypeError, BenchmarkError) as exc:
            parser.error(f"--render-only: cannot read {args.json}: {exc}")
    else:
        run = run_suite(
            _profiles(args.profile),
            only,
            show,
            console,
            lambda partial: write_json(args.json, partial),
        )

    table = markdown_table(run.measurements)
    print(table)
    for name, why in run.failures.items():
        print(f"FAILED {name}: {why}")
    for name, why in run.skipped.items():
        print(f"skipped {name}: {why}")
    if not args.render_only:
        write_json(args.json, run)
    print(f"JSON: {args.json}")
    if not args.no_plots:
        for path in write_plots(args.plots_dir, run):
            print(f"plot: {path}")
    if not args.no_markdown:
        command = "python benchmarks/systems/run_systems.py " + (
            f"--profile {run.profile}"
            if args.render_only
            else shlex.join(a for a in (argv if argv is not None else sys.argv[1:]))
        )
        try:
            write_section(args.markdown, section_markdown(run, command.strip()))
        except ReportError as exc:
            print(f"BENCHMARKS.md not updated: {exc}", file=sys.stderr)
            return 1
        print(f"markdown section: {args.markdown}")
    return 1 if run.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
