"""Flower's side of the comparison (runs in the Flower virtualenv, see README.md): the same
network (crossfed's CrossModalNet) trained by the same `train_local` on the same client
shards, as a Flower `ClientApp` on Flower's Ray-based Simulation Engine, aggregated by
Flower's `FedAvg` with the same fraction of clients per round. Prints one JSON line.

    python flower_side.py --shards shards.safetensors --config model.json --rounds 10 \
        --fraction 0.1 --cpus 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from crossfed.client.local_trainer import TrainConfig, train_local
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.evaluation import evaluate
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from safetensors.torch import load_file

_CACHE: dict[str, Any] = {}  # per worker process: the shards file and the network
SETTINGS: dict[str, Any] = {}


def _shard(path: str, client: int) -> EmbeddingSet:
    """The client's rows from the shards file (read once per Flower worker process)."""
    if "shards" not in _CACHE:
        _CACHE["shards"] = load_file(path)
    t = _CACHE["shards"]
    lo, hi = int(t["offsets"][client]), int(t["offsets"][client + 1])
    return EmbeddingSet(
        text=t["text"][lo:hi],
        image=t["image"][lo:hi],
        has_text=t["has_text"][lo:hi],
        has_image=t["has_image"][lo:hi],
        labels=t["labels"][lo:hi],
    )


def _model(config_json: str) -> CrossModalNet:
    if _CACHE.get("config") != config_json:
        _CACHE["config"] = config_json
        _CACHE["model"] = CrossModalNet(ModelConfig.model_validate_json(config_json))
    model: CrossModalNet = _CACHE["model"]
    return model


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of one client: load the global weights, train_local, send them back."""
    cfg = msg.content["config"]
    client = int(context.node_config["partition-id"])
    model = _model(str(cfg["model"]))
    model.load_shareable_state_dict(msg.content["arrays"].to_torch_state_dict())
    data = _shard(str(cfg["shards"]), client)
    result = train_local(
        model,
        data,
        TrainConfig(
            epochs=1,
            batch_size=int(cfg["batch-size"]),
            lr=float(cfg["lr"]),
            seed=int(cfg["seed"]) + client,
            num_threads=1,
        ),
    )
    reply = RecordDict(
        {
            "arrays": ArrayRecord(model.shareable_state_dict()),
            "metrics": MetricRecord({"num-examples": result.num_samples}),
        }
    )
    return Message(content=reply, reply_to=msg)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    s = SETTINGS
    config = ModelConfig.model_validate_json(s["model"])
    torch.manual_seed(0)
    initial = CrossModalNet(config).shareable_state_dict()
    strategy = FedAvg(
        fraction_train=s["fraction"],
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=s["clients"],
    )
    from flwr.app import ConfigRecord

    train_config = ConfigRecord(
        {
            "model": s["model"],
            "shards": s["shards"],
            "batch-size": s["batch_size"],
            "lr": s["lr"],
            "seed": 0,
        }
    )
    started = time.perf_counter()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial),
        num_rounds=s["rounds"],
        train_config=train_config,
    )
    s["rounds_s"] = time.perf_counter() - started
    s["final"] = result.arrays.to_torch_state_dict()


def run(args: argparse.Namespace) -> dict[str, Any]:
    shards = load_file(str(args.shards))
    clients = len(shards["offsets"]) - 1
    SETTINGS.update(
        model=Path(args.config).read_text(),
        shards=str(Path(args.shards).resolve()),
        clients=clients,
        fraction=args.fraction,
        rounds=args.rounds,
        batch_size=args.batch_size,
        lr=args.lr,
    )
    started = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": args.cpus, "object_store_memory": 512 * 2**20},
        },
    )
    wall = time.perf_counter() - started
    model = CrossModalNet(ModelConfig.model_validate_json(SETTINGS["model"]))
    model.load_shareable_state_dict(SETTINGS["final"])
    model.eval()
    test = EmbeddingSet.load(args.test)
    scores = evaluate(model, test)
    return {
        "framework": "flower",
        "clients": clients,
        "rounds": args.rounds,
        "wall_s": wall,
        "rounds_s": SETTINGS["rounds_s"],
        "rounds_per_minute": 60 * args.rounds / SETTINGS["rounds_s"],
        "accuracy": {c: v["accuracy"] for c, v in scores.items()},
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--test", type=Path, required=True)
    p.add_argument("--config", type=Path, required=True, help="ModelConfig JSON")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--cpus", type=int, default=2)
    return p.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(run(parse())), flush=True)
