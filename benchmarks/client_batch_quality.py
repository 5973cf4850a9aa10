"""Does the client's default batch size change federated quality? Demo-shaped check.

Three clients of the built-in dataset (both / text-only / image-only, Dirichlet alpha 5),
each trained with the client defaults other than the batch size (lr 1e-3, the demo's 2 local
epochs, 1 intra-op thread), FedAvg + prototype exchange through the simulator's
`run_federation` with the inline executor (no DP noise on projections), scored on the demo's
held-out set per Table I configuration. Prints one JSON line per (batch size, seed) and a per-batch summary.

Usage: python benchmarks/client_batch_quality.py --batch 32 256 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from crossfed.client.local_data import LocalDataSpec, load_local_data
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet

from crossfed.demo.evaluation import HeldOutEvaluator
from crossfed.simulation.client_executor import InlineExecutor
from crossfed.simulation.experiment import RoundsSection
from crossfed.simulation.federation_run import RunPlan, run_federation
from crossfed.simulation.strategy import make_strategy
from crossfed.simulation.virtual_client import shard_arrays

MODALITIES = ("both", "text_only", "image_only")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--cache-dir", type=Path, default=Path("runs/.cache"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    summary: dict[int, dict[str, list[float]]] = {}
    for seed in args.seeds:
        shards = [
            load_local_data(
                LocalDataSpec(
                    modality=modality,  # type: ignore[arg-type]
                    num_samples=args.samples,
                    num_clients=len(MODALITIES),
                    client_index=i,
                    dirichlet_alpha=5.0,
                    seed=seed,
                ),
                cache_dir=args.cache_dir.resolve(),
            ).train
            for i, modality in enumerate(MODALITIES)
        ]
        held_out = HeldOutEvaluator.build(1000, seed + 1_000_003, args.cache_dir.resolve())
        for batch in args.batch:
            plan = RunPlan(
                method="ours",
                seed=seed,
                model=ModelConfig(),
                rounds=RoundsSection(rounds=args.rounds),
                local_epochs=args.epochs,
                batch_size=batch,
                lr=args.lr,
                modality_dropout=0.0,
                exchange_projections=True,
                calibration_noise=0.0,
                threads_per_client=1,
            )
            started = time.perf_counter()
            scores = run_federation(
                plan,
                InlineExecutor(),
                [shard_arrays(s) for s in shards],
                held_out.data,
                make_strategy("fedavg", CrossModalNet.module_of),
            ).record.scores
            acc = {name: round(scores[name]["accuracy"], 4) for name in MODALITIES}
            row = {"batch": batch, "seed": seed, "accuracy": acc}
            row["seconds"] = round(time.perf_counter() - started, 1)
            print(json.dumps(row), flush=True)
            for name, value in acc.items():
                summary.setdefault(batch, {}).setdefault(name, []).append(value)
    for batch, per in summary.items():
        means = {k: round(statistics.mean(v), 4) for k, v in per.items()}
        print(json.dumps({"batch": batch, "mean_accuracy": means, "seeds": args.seeds}))


if __name__ == "__main__":
    main()
