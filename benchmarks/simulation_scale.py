"""Scale of `crossfed simulate`: N virtual clients on an embedded Ray instance, a fraction
sampled per round, the paper's method (ours) on the built-in data (encoded once, cached).
Each client count runs in a fresh process, so every peak is its own. Prints one table and
writes benchmarks/results/simulation_scale.json.

Reported per client count: wall time (data load, Ray start, the rounds), seconds per round,
the driver's peak resident memory (VmHWM) and, at the end, its private part (RssAnon) and the
shared object-store pages it maps (RssShmem: the updates it read, bounded by the store's
size, not by the clients); the busiest Ray worker's peak and private memory; the private
memory of all Ray processes (GCS, raylet, agents, workers) at the end; the client data put
into the object store; and the VLMR memory the clients keep between rounds.

    python benchmarks/simulation_scale.py [--clients 100 1000] [--rounds 10] [--fraction 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _status_mib(pid: int | str, field: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_one(
    clients: int, rounds: int, fraction: float, samples: int, cache: Path
) -> dict[str, Any]:
    """One client count, in this process."""
    from crossfed.client.resource_usage import peak_rss_bytes

    from crossfed.simulation.experiment import ExperimentConfig
    from crossfed.simulation.experiment_run import open_executor, run_experiment
    from crossfed.simulation.federation_data import load_data

    cfg = ExperimentConfig.model_validate(
        {
            "name": f"scale-{clients}",
            "data": {"kind": "builtin", "num_samples": samples, "cache_dir": str(cache)},
            "federation": {
                "clients": clients,
                "dirichlet_alpha": 0.5,
                "missing": {"mode": "per_sample", "rate": 0.5},
            },
            "rounds": {"rounds": rounds, "fraction": fraction},
            "model": {"hidden_dim": 128},
            "methods": ["ours"],
        }
    )
    started = time.perf_counter()
    data = load_data(cfg.data)
    loaded = time.perf_counter()
    executor = open_executor(cfg)
    ray_up = time.perf_counter()
    try:
        result = run_experiment(cfg, executor, data, progress=False)
        ray_private = sum(_status_mib(pid, "RssAnon") for pid in _descendants(os.getpid()))
        driver_private = _status_mib("self", "RssAnon")
        driver_shared = _status_mib("self", "RssShmem")
    finally:
        executor.close()
    run = result.runs[0]
    per_round = [r.seconds for r in run.rounds]
    sizes = result.federations[0].client_sizes
    shard_bytes = len(data.embeddings) * (
        (data.embeddings.text_dim + data.embeddings.image_dim) * 4 + 8 + 2
    )
    return {
        "clients": clients,
        "sampled_per_round": run.rounds[0].sampled,
        "rounds": rounds,
        "rows_per_client": {"min": min(sizes), "median": sorted(sizes)[len(sizes) // 2]},
        "wall_s": time.perf_counter() - started,
        "data_s": loaded - started,
        "ray_start_s": ray_up - loaded,
        "rounds_s": sum(per_round),
        "round_s_first": per_round[0],  # includes starting the Ray workers (imports)
        "round_s_later": sum(per_round[1:]) / max(1, len(per_round) - 1),
        "round_s_max": max(per_round),
        "load_average": os.getloadavg()[0],
        "rounds_per_minute": 60 * len(per_round) / sum(per_round),
        "driver_peak_rss_mib": peak_rss_bytes() / 2**20,
        "driver_private_end_mib": driver_private,
        "driver_object_store_pages_end_mib": driver_shared,
        "worker_peak_rss_mib": max(r.worker_peak_rss_mib for r in run.rounds),
        "worker_private_mib": max(r.worker_private_mib for r in run.rounds),
        "ray_processes_private_end_mib": ray_private,
        "client_data_mib": shard_bytes / 2**20,
        "client_state_mib": run.rounds[-1].client_state_mib,
        "accuracy": {c: v["accuracy"] for c, v in run.scores.items()},
        "slots": result.execution["slots"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        (
            "| clients | sampled/round | wall s | Ray start s | s/round (first, later) | rounds/min "
            "| driver peak / private / store pages MiB | worker peak / private MiB "
            "| Ray processes private MiB | client data MiB | client state MiB "
            "| accuracy (both / text / image) |"
        ),
        "|---:|---:|---:|---:|---|---:|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        acc = r["accuracy"]
        lines.append(
            f"| {r['clients']} | {r['sampled_per_round']} | {r['wall_s']:.1f} | "
            f"{r['ray_start_s']:.1f} | {r['round_s_first']:.2f}, {r['round_s_later']:.2f} | "
            f"{r['rounds_per_minute']:.1f} | {r['driver_peak_rss_mib']:.0f} / "
            f"{r['driver_private_end_mib']:.0f} / {r['driver_object_store_pages_end_mib']:.0f} | "
            f"{r['worker_peak_rss_mib']:.0f} / {r['worker_private_mib']:.0f} | "
            f"{r['ray_processes_private_end_mib']:.0f} | {r['client_data_mib']:.1f} | "
            f"{r['client_state_mib']:.1f} | {acc['both']:.3f} / {acc['text_only']:.3f} / "
            f"{acc['image_only']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--cache-dir", type=Path, default=_REPO / ".crossfed" / "cache")
    p.add_argument("--json", type=Path, default=_REPO / "benchmarks/results/simulation_scale.json")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: one client count
    args = p.parse_args(argv)
    if args.one is not None:
        row = run_one(args.one, args.rounds, args.fraction, args.samples, args.cache_dir)
        print(json.dumps(row))
        return 0
    rows = []
    for n in args.clients:
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                str(n),
                "--rounds",
                str(args.rounds),
                "--fraction",
                str(args.fraction),
                "--samples",
                str(args.samples),
                "--cache-dir",
                str(args.cache_dir),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            print(child.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    print(f"load average (1 min) at the end of each: {[round(r['load_average'], 1) for r in rows]}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
