"""Training throughput of `train_local` (eq. 2-14) on synthetic cached embeddings.

No encoders: f_t / f_i are class-structured unit vectors with the systems benchmark's shapes
(384 / 256, 12 classes) and missingness (per sample, 40%: half text-only, half image-only),
so a run takes seconds and isolates the trainer. Prints one JSON line per (batch, threads)
with samples per wall second and per CPU second of each repeat, and their medians. Only public APIs are used, so the same
script measures any checkout (run it with that checkout's package first on sys.path).

Usage: python benchmarks/train_throughput.py --batch 32 1024 --threads 1 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from crossfed.client.local_trainer import TrainConfig, train_local
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.data.missingness import per_sample_masks
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet


def synthetic_set(n: int, missing_rate: float, seed: int = 0) -> EmbeddingSet:
    """Unit-norm class prototype + noise per modality; absent modalities are zero rows."""
    g = torch.Generator().manual_seed(seed)
    cfg = ModelConfig()
    y = torch.randint(0, cfg.num_classes, (n,), generator=g)
    t_dirs = torch.randn(cfg.num_classes, cfg.text_dim, generator=g)
    i_dirs = torch.randn(cfg.num_classes, cfg.image_dim, generator=g)
    text = nn_normalize(t_dirs[y] + 1.5 * torch.randn(n, cfg.text_dim, generator=g))
    image = nn_normalize(i_dirs[y] + 1.5 * torch.randn(n, cfg.image_dim, generator=g))
    masks = per_sample_masks(n, missing_rate, seed=seed)
    has_t, has_i = torch.from_numpy(masks.has_text), torch.from_numpy(masks.has_image)
    return EmbeddingSet(
        text=text * has_t[:, None], image=image * has_i[:, None],
        has_text=has_t, has_image=has_i, labels=y,
    )  # fmt: skip


def nn_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (what the frozen encoders emit)."""
    return x / x.norm(dim=1, keepdim=True)


def rate(
    data: EmbeddingSet, batch: int, threads: int, epochs: int, zero: bool, intra_op: bool = False
) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second) of one fresh-model train_local run.

    On a shared machine the CPU-second figure is the load-independent one: with one thread it
    is the wall rate the run would have on an idle core.
    """
    torch.manual_seed(0)
    model = CrossModalNet(ModelConfig(missing_fill="zero") if zero else ModelConfig())
    extra = {"branch_threads": False} if intra_op else {}  # a field older checkouts lack
    cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=2e-3, num_threads=threads, **extra)
    t0, c0 = time.perf_counter(), time.process_time()
    res = train_local(model, data, cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert res.num_samples == len(data)
    return epochs * len(data) / wall, epochs * len(data) / cpu


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--missing-rate", type=float, default=0.4)
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 256, 1024])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--zero-fill", action="store_true", help="zero-fill baseline model")
    ap.add_argument("--label", default="")
    ap.add_argument(
        "--intra-op", action="store_true", help="split each op over the threads (no branches)"
    )
    args = ap.parse_args(argv)
    data = synthetic_set(args.samples, args.missing_rate)
    rate(data, 256, 1, 1, args.zero_fill)  # warm-up: allocator, first-call overheads
    for threads in args.threads:
        for batch in args.batch:
            runs = [
                rate(data, batch, threads, args.epochs, args.zero_fill, args.intra_op)
                for _ in range(args.repeats)
            ]
            wall, cpu = [r[0] for r in runs], [r[1] for r in runs]
            row = {
                "label": args.label,
                "batch": batch,
                "threads": threads,
                "zero_fill": args.zero_fill,
                "intra_op": args.intra_op,
                "median": round(statistics.median(wall)),
                "runs": [round(r) for r in wall],
                "median_per_cpu_s": round(statistics.median(cpu)),
                "runs_per_cpu_s": [round(r) for r in cpu],
                "load": round(os.getloadavg()[0], 2),
            }
            print(json.dumps(row), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
