"""Edge-client resources of one federated round (no server): peak RSS and wall time of
load-global -> evaluate -> train_local -> serialize -> projection release, on the built-in
dataset, each measured in a fresh process. Printed as ratios against baselines taken in the
same run: RSS against the idle client process (torch + crossfed imported, nothing loaded),
round time against the same round with torch's default thread count.

Run: ``python benchmarks/client_round_resources.py [--samples 20000] [--epochs 1]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, sys, time
from pathlib import Path
from crossfed.client.resource_usage import limit_threads, peak_rss_bytes, reset_peak_rss, current_rss_bytes
args = json.loads(sys.argv[1])
limit_threads(args["threads"])
import torch
from crossfed.client.local_data import LocalDataSpec, load_local_data
from crossfed.client.local_trainer import TrainConfig
from crossfed.client.loop import Registered
from crossfed.client.round_worker import ModelRoundWorker, WorkerSettings
from crossfed.common.config import ClientPrivacyConfig
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet
from crossfed.common.wire.tensor_codec import encode_tensors
idle = current_rss_bytes()
if args["idle_only"]:
    print(json.dumps({"idle_rss": idle})); sys.exit(0)
spec = LocalDataSpec(num_samples=args["samples"], holdout_fraction=0.1, modality=args["modality"])
data = load_local_data(spec, cache_dir=Path(args["cache"]))
after_data = peak_rss_bytes()
config = ModelConfig()
worker = ModelRoundWorker(data, WorkerSettings(
    train=TrainConfig(epochs=args["epochs"], batch_size=32, lr=1e-3, num_threads=args["threads"]),
    privacy=ClientPrivacyConfig()))
worker.on_registered(Registered("bench", "run", 1, config.model_dump_json(), 1.0, 1 << 20))
payload = encode_tensors(CrossModalNet(config).shareable_state_dict())
reset_peak_rss()
start = time.perf_counter()
worker.load_global(1, payload)
update = worker.train(1, None)
release = worker.projections(1)
seconds = time.perf_counter() - start
print(json.dumps({"idle_rss": idle, "load_peak_rss": after_data, "round_peak_rss": peak_rss_bytes(),
                  "round_s": seconds, "train_samples": len(data.train),
                  "update_bytes": len(update.payload), "projection_bytes": len(release.payload) if release else 0,
                  "torch_threads": torch.get_num_threads()}))
"""


def _child(args: dict[str, object]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(args)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    """Measure and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000, help="built-in dataset size")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--modality", default="both", choices=["both", "text_only", "image_only"])
    parser.add_argument("--cache", default=".crossfed-cache", help="embedding cache dir")
    opts = parser.parse_args()
    base = {
        "samples": opts.samples,
        "epochs": opts.epochs,
        "modality": opts.modality,
        "cache": str(Path(opts.cache).resolve()),
        "idle_only": False,
    }
    idle = _child({**base, "threads": None, "idle_only": True})["idle_rss"]
    _child({**base, "threads": 1})  # warm the embedding cache: encoding is not part of a round
    default = _child({**base, "threads": None})
    single = _child({**base, "threads": 1})
    mib = 2**20
    print(
        f"built-in dataset, {opts.samples} samples, one client holding "
        f"{single['train_samples']} training samples ({opts.modality}), "
        f"{opts.epochs} local epoch(s), batch 32"
    )
    print(
        f"update payload {single['update_bytes'] / mib:.2f} MiB, projections "
        f"{single['projection_bytes'] / 1024:.1f} KiB\n"
    )
    print("| measure | threads | value | ratio to baseline |")
    print("|---|---|---|---|")
    print(f"| idle client RSS (baseline) | - | {idle / mib:.0f} MiB | 1.00 |")
    for name, row in (("default", default), ("1", single)):
        threads = f"{name} ({int(row['torch_threads'])})"
        print(
            f"| peak RSS loading data (cached) | {threads} | {row['load_peak_rss'] / mib:.0f} MiB "
            f"| {row['load_peak_rss'] / idle:.2f} |"
        )
        print(
            f"| peak RSS during the round | {threads} | {row['round_peak_rss'] / mib:.0f} MiB | "
            f"{row['round_peak_rss'] / idle:.2f} |"
        )
    print(
        f"| round wall time (baseline: default threads) | default | {default['round_s']:.2f} s "
        f"| 1.00 |"
    )
    print(
        f"| round wall time | 1 | {single['round_s']:.2f} s | "
        f"{single['round_s'] / default['round_s']:.2f} |"
    )


if __name__ == "__main__":
    main()
