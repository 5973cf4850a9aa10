"""Streaming FedAvg throughput (eq. 15) vs the numpy baseline ``acc += w * x`` over the same
bytes, measured in the same run and printed as a ratio (target >= 0.8).

    python benchmarks/fedavg_throughput.py [--mib 256] [--clients 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from crossfed.server.aggregation import StreamingFedAvg, module_weights_of
from rich.progress import Progress


def _model(total_mib: int, tensors: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    per = total_mib * 1024 * 1024 // 4 // tensors
    return {f"m{i % 4}.t{i}": torch.rand(per, generator=g) for i in range(tensors)}


def _run_streaming(glob: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]]) -> float:
    agg = StreamingFedAvg(glob, lambda k: k.split(".")[0])
    start = time.perf_counter()
    for i, upd in enumerate(updates):
        agg.add(upd, module_weights_of(10 + i, {}, agg.modules), 10 + i)
    return time.perf_counter() - start


def _run_numpy(glob: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]]) -> float:
    acc = {k: np.zeros(v.shape, dtype=np.float32) for k, v in glob.items()}
    arrays = [{k: v.numpy() for k, v in u.items()} for u in updates]
    start = time.perf_counter()
    for i, upd in enumerate(arrays):
        w = np.float32(10 + i)
        for k, x in upd.items():
            acc[k] += w * x
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="model size in MiB")
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--clients", type=int, default=4, help="updates folded per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (the server runs with 1: it parallelises across uploads)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    glob = _model(args.mib, args.tensors, 0)
    updates = [_model(args.mib, args.tensors, s + 1) for s in range(args.clients)]
    folded = args.mib * args.clients
    best_stream, best_numpy = float("inf"), float("inf")
    disable = args.no_progress or not sys.stdout.isatty()
    with Progress(disable=disable) as progress:
        task = progress.add_task("fedavg", total=args.repeats)
        for _ in range(args.repeats):
            best_numpy = min(best_numpy, _run_numpy(glob, updates))
            best_stream = min(best_stream, _run_streaming(glob, updates))
            progress.advance(task)
    stream_gbs = folded / 1024 / best_stream
    numpy_gbs = folded / 1024 / best_numpy
    print(
        f"model {args.mib} MiB x {args.clients} updates, torch threads {torch.get_num_threads()}\n"
        f"numpy acc += w * x : {numpy_gbs:6.2f} GiB/s of updates (baseline)\n"
        f"StreamingFedAvg.add: {stream_gbs:6.2f} GiB/s of updates\n"
        f"ratio streaming/numpy = {stream_gbs / numpy_gbs:.2f} (target >= 0.8)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
