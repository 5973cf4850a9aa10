"""crossfed simulate vs Flower's simulation, in one run: the same network (CrossModalNet,
hidden 128), the same client shards of the built-in data, the same client count, fraction
per round and local training (`train_local`, 1 epoch, batch 64, 1 thread per client), both
on Ray with one CPU per client. Reports rounds per minute (the rounds alone, and the whole
run with startup) for both. Run with crossfed's virtualenv; the Flower side runs in its own
virtualenv (README.md).

    .venv/bin/python benchmarks/flower_compare/run_compare.py \
        --flower-python /tmp/flwr-venv/bin/python [--clients 1000] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from crossfed.simulation.experiment import ExperimentConfig
from crossfed.simulation.federation_data import FederationSetup, build_federation, load_data
from crossfed.simulation.methods import FEDERATED_METHODS

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parents[1]


def experiment(args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """What both sides run. crossfed scores the global model only after the last round
    (Flower's side does no evaluation while it runs)."""
    return {
        "name": f"vs-flower-{args.clients}",
        "data": {"kind": "builtin", "num_samples": args.samples, "cache_dir": str(cache)},
        "federation": {
            "clients": args.clients,
            "dirichlet_alpha": 0.5,
            "missing": {"mode": "per_sample", "rate": 0.5},
        },
        "rounds": {"rounds": args.rounds, "fraction": args.fraction, "eval_every": args.rounds},
        "train": {"local_epochs": 1, "batch_size": 64, "lr": 2e-3},
        "model": {"hidden_dim": 128},
        "methods": [args.method],
        "execution": {"backend": "ray", "num_cpus": args.cpus, "cpus_per_client": 1},
    }


def export_shards(cfg: ExperimentConfig, out: Path) -> tuple[Path, Path, Path]:
    """The federation crossfed builds for seed 0, as one file Flower's clients slice."""
    loaded = load_data(cfg.data)
    fed = build_federation(loaded.embeddings, FederationSetup.of(cfg, 0), cfg.data.test_fraction)
    sizes = torch.tensor([0] + [len(s) for s in fed.shards]).cumsum(0)
    cat = {
        name: torch.cat([getattr(s, name) for s in fed.shards]).contiguous()
        for name in ("text", "image", "has_text", "has_image", "labels")
    }
    shards = out / "shards.safetensors"
    save_file({**cat, "offsets": sizes}, str(shards))
    test = out / "test.safetensors"
    fed.test.save(test)
    base = cfg.model_config_for(
        loaded.embeddings.text_dim, loaded.embeddings.image_dim, len(loaded.class_names)
    )
    config = out / "model.json"  # the network the method trains (methods.py's recipe)
    config.write_text(FEDERATED_METHODS[cfg.methods[0]].config_update(base).model_dump_json())
    return shards, test, config


def crossfed_side(exp: Path, out: Path) -> dict[str, Any]:
    crossfed = str(Path(sys.executable).with_name("crossfed"))
    started = time.perf_counter()
    proc = subprocess.run(
        [crossfed, "simulate", str(exp), "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"crossfed simulate failed:\n{proc.stderr[-3000:]}")
    doc = json.loads((out / "result.json").read_text())
    run = doc["runs"][0]
    rounds_s = sum(r["seconds"] for r in run["rounds"])
    return {
        "framework": "crossfed",
        "clients": len(doc["federations"]["0"]["client_sizes"]),
        "rounds": len(run["rounds"]),
        "wall_s": wall,
        "rounds_s": rounds_s,
        "rounds_per_minute": 60 * len(run["rounds"]) / rounds_s,
        "accuracy": {c: v["accuracy"] for c, v in run["scores"].items()},
    }


def flower_side(
    python: str, shards: Path, test: Path, config: Path, args: argparse.Namespace
) -> dict[str, Any]:
    started = time.perf_counter()
    proc = subprocess.run(
        [
            python,
            str(_HERE / "flower_side.py"),
            "--shards",
            str(shards),
            "--test",
            str(test),
            "--config",
            str(config),
            "--rounds",
            str(args.rounds),
            "--fraction",
            str(args.fraction),
            "--cpus",
            str(args.cpus),
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    if proc.returncode != 0:
        raise SystemExit(f"Flower side failed:\n{proc.stderr[-3000:]}")
    row: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    row["wall_s"] = time.perf_counter() - started
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--flower-python", required=True, help="python of the Flower virtualenv")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument(
        "--method",
        default="zero_fill",
        help="the method both train (zero_fill: the same work on both sides; ours adds VLMR "
        "memory kept per client and the projection exchange on crossfed's side only)",
    )
    p.add_argument("--cache-dir", type=Path, default=_REPO / ".crossfed" / "cache")
    p.add_argument("--json", type=Path, default=_REPO / "benchmarks/results/flower_compare.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="crossfed-vs-flower-") as tmp:
        work = Path(tmp)
        doc = experiment(args, args.cache_dir)
        exp = work / "experiment.yaml"
        exp.write_text(yaml.safe_dump(doc))
        cfg = ExperimentConfig.model_validate(doc)
        shards, test, config = export_shards(cfg, work)
        rows = [
            crossfed_side(exp, work / "crossfed"),
            flower_side(args.flower_python, shards, test, config, args),
        ]
    print(
        "| framework | clients | sampled/round | rounds | rounds/min (rounds only) "
        "| wall s incl. startup | accuracy both / text / image |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        acc = r["accuracy"]
        print(
            f"| {r['framework']} | {r['clients']} | {round(args.fraction * r['clients'])} | "
            f"{r['rounds']} | {r['rounds_per_minute']:.1f} | {r['wall_s']:.1f} | "
            f"{acc['both']:.3f} / {acc['text_only']:.3f} / {acc['image_only']:.3f} |"
        )
    speedup = rows[0]["rounds_per_minute"] / rows[1]["rounds_per_minute"]
    print(f"crossfed / Flower rounds per minute: {speedup:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    doc = {"cpus": args.cpus, "method": args.method, "rows": rows, "speedup": speedup}
    args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
