"""How far honest updates move from the global model: the measurement behind the default
update bound (`update_bound.max_norm_ratio`, server/update_bound.py).

Replays the demo's federation in one process with the real client code (`load_local_data`,
`ModelRoundWorker`: local training, DP-noised projections) and the real server code
(`StreamingFedAvg`, `UpdateBounder`, the projection aggregator), with no bound applied, and
prints the distribution of ||theta_i - theta_g|| / ||theta_g|| (over the tensors each update
contributes to eq. 15) per setting, round and overall:

    .venv/bin/python benchmarks/update_norms.py                    # demo settings, 3 seeds
    .venv/bin/python benchmarks/update_norms.py --epochs 5 --lr 3e-3 --clients 6 --alpha 0.5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from crossfed.client.local_data import ClientModality, LocalDataSpec, load_local_data
from crossfed.client.local_trainer import TrainConfig
from crossfed.client.loop import Registered
from crossfed.client.round_worker import ModelRoundWorker, WorkerSettings
from crossfed.common.config import ClientPrivacyConfig
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet
from crossfed.common.privacy.projection_dp import ProjectionMandate
from crossfed.common.wire.tensor_codec import decode_tensors, encode_tensors
from crossfed.server.aggregation import StreamingFedAvg, module_weights_of
from crossfed.server.projection_exchange import ProjectionAggregator, ProjectionSpec
from crossfed.server.update_bound import UpdateBound, UpdateBounder

MODALITIES = (ClientModality.BOTH, ClientModality.TEXT_ONLY, ClientModality.IMAGE_ONLY)


@dataclass(frozen=True)
class Setting:
    """One federation to replay (defaults: `crossfed demo`)."""

    clients: int = 3
    samples: int = 3000
    alpha: float = 5.0
    rounds: int = 5
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0


def replay(setting: Setting, cache_dir: Path) -> list[tuple[int, str, float]]:
    """(round, client, ratio) of every honest update of one federation."""
    config = ModelConfig()
    privacy = ClientPrivacyConfig()
    mandate = ProjectionMandate(privacy.noise_multiplier, privacy.clip, privacy.delta, None)
    workers = []
    for index in range(setting.clients):
        modality = MODALITIES[index % 3]
        spec = LocalDataSpec(
            modality=modality,
            num_samples=setting.samples,
            num_clients=setting.clients,
            client_index=index,
            dirichlet_alpha=setting.alpha,
            seed=setting.seed,
        )
        data = load_local_data(spec, cache_dir)
        train = TrainConfig(
            epochs=setting.epochs,
            batch_size=setting.batch_size,
            lr=setting.lr,
            seed=setting.seed * 1000 + index,
            num_threads=1,
        )
        worker = ModelRoundWorker(data, WorkerSettings(train=train, privacy=privacy))
        worker.on_registered(
            Registered(f"c{index}", "r", 1, config.model_dump_json(), 1.0, 1 << 20, mandate)
        )
        workers.append((f"{index}-{modality.value}", worker))
    torch.manual_seed(setting.seed)
    global_state = CrossModalNet(config).shareable_state_dict()
    spec = ProjectionSpec(config.num_classes, config.text_dim, config.image_dim)
    out = []
    for round_no in range(1, setting.rounds + 1):
        fold = StreamingFedAvg(global_state, CrossModalNet.module_of)
        bounder = UpdateBounder(global_state, UpdateBound(1.0))
        projections = ProjectionAggregator(spec)
        payload = encode_tensors(global_state)
        for name, worker in workers:
            worker.load_global(round_no, payload)
            update = worker.train(round_no, None)
            tensors = decode_tensors(update.payload)
            weights = module_weights_of(update.num_samples, update.module_samples, fold.modules)
            check = bounder.check(tensors, fold.contributed_keys(weights))
            out.append((round_no, name, check.ratio))
            fold.add(tensors, weights, update.num_samples)
            released = worker.projections(round_no)
            if released is not None:
                sent = decode_tensors(released.payload)
                projections.add(name, round_no, {k: v.double() for k, v in sent.items()})
        global_state = fold.result()
        if projections.contributors:
            sums = {k: v.float() for k, v in projections.sums().items()}
            for _, worker in workers:
                worker.receive_prototypes(round_no, encode_tensors(sums))
    return out


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def describe(values: list[float]) -> str:
    return (
        f"n={len(values):3d}  min {min(values):.4f}  median {statistics.median(values):.4f}  "
        f"p90 {_quantile(values, 0.9):.4f}  max {max(values):.4f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--clients", type=int, default=Setting.clients)
    parser.add_argument("--samples", type=int, default=Setting.samples)
    parser.add_argument("--alpha", type=float, default=Setting.alpha)
    parser.add_argument("--rounds", type=int, default=Setting.rounds)
    parser.add_argument("--epochs", type=int, default=Setting.epochs)
    parser.add_argument("--batch-size", type=int, default=Setting.batch_size)
    parser.add_argument("--lr", type=float, default=Setting.lr)
    parser.add_argument("--cache-dir", type=Path, default=Path(".crossfed-cache"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ratios: list[float] = []
    per_round: dict[int, list[float]] = {}
    per_client: dict[str, list[float]] = {}
    started = time.perf_counter()
    for seed in args.seeds:
        setting = Setting(
            args.clients, args.samples, args.alpha, args.rounds, args.epochs,
            args.batch_size, args.lr, seed,
        )  # fmt: skip
        for round_no, client, ratio in replay(setting, args.cache_dir):
            ratios.append(ratio)
            per_round.setdefault(round_no, []).append(ratio)
            per_client.setdefault(client, []).append(ratio)
        print(f"seed {seed} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    print(f"update norm ratio ||theta_i - theta_g|| / ||theta_g||, {vars(args)}")
    for round_no, values in sorted(per_round.items()):
        print(f"  round {round_no}: {describe(values)}")
    for client, values in sorted(per_client.items()):
        print(f"  client {client:14s}: {describe(values)}")
    print(f"  all: {describe(ratios)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
