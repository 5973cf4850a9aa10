"""Image-only probe benchmark: pretrained vs seeded-random default CNN (E_i of eq. 1).

On the built-in synthetic-shapes benchmark (4k train / 1k test by default, image only), fits
a ridge classifier, a logistic-regression probe and a small MLP on frozen features of each
encoder and reports 12-class accuracy plus the shape / colour factors read off the 12-class
predictions; and encode throughput on 1 thread (wall and CPU time). Every number is printed
as a ratio against the random CNN measured in the same run.

Run: ``python benchmarks/image_encoder_probe.py [--weights PATH] [--train 4000 --test 1000]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from crossfed.common.data.encoder_interface import ImageEncoder
from crossfed.common.data.synthetic_shapes import (
    COLOURS,
    SyntheticShapesConfig,
    generate_synthetic_shapes,
)
from crossfed.common.model.encoders import SMALL_CNN_WEIGHTS, SmallCNNImageEncoder
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

# tools/ (the encoder's pretraining recipe) is a repository folder, not an installed package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.cnn_pretraining import ridge_probe_accuracy


class ProbeSettings(BaseModel):
    """Validated command-line input."""

    model_config = ConfigDict(extra="forbid")

    weights: Path = SMALL_CNN_WEIGHTS
    train: int = Field(4000, gt=10)
    test: int = Field(1000, gt=10)
    seed: int = 0
    probe_steps: int = Field(400, gt=0)
    speed_images: int = Field(4096, gt=0)
    threads: int = Field(2, gt=0, description="for probes; encode speed is on 1 thread")
    json_out: Path | None = None


def _trained_probe_accuracy(
    hidden: int, xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, steps: int, seed: int
) -> torch.Tensor:
    """Full-batch AdamW on standardised features: linear (hidden=0) or 1-hidden-layer MLP."""
    torch.manual_seed(seed)
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    classes = int(ytr.max()) + 1
    model: nn.Module = (
        nn.Linear(xtr.shape[1], classes)
        if hidden == 0
        else nn.Sequential(
            nn.Linear(xtr.shape[1], hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, classes)
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    model.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(xtr), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return model(xte).argmax(1)


def _encode_speed(encoder: ImageEncoder, images: torch.Tensor) -> tuple[float, float]:
    """(images/s wall, images/s CPU time) of encoder.encode on 1 thread, best of 3."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        arr = images.numpy()
        encoder.encode(arr[:256])
        best_wall = best_cpu = float("inf")
        for _ in range(3):
            wall, cpu = time.perf_counter(), time.process_time()
            encoder.encode(arr)
            best_wall = min(best_wall, time.perf_counter() - wall)
            best_cpu = min(best_cpu, time.process_time() - cpu)
    finally:
        torch.set_num_threads(old)
    return len(arr) / best_wall, len(arr) / best_cpu


def evaluate(encoder: ImageEncoder, s: ProbeSettings) -> dict[str, float]:
    """All probe accuracies and encode speeds of one encoder."""
    data = generate_synthetic_shapes(
        SyntheticShapesConfig(num_samples=s.train + s.test, seed=s.seed)
    )
    feats = encoder.encode(data.images)
    labels = torch.from_numpy(data.labels)
    xtr, xte, ytr, yte = feats[: s.train], feats[s.train :], labels[: s.train], labels[s.train :]
    out: dict[str, float] = {"ridge": ridge_probe_accuracy(xtr, ytr, xte, yte)}
    n_col = len(COLOURS)
    for name, hidden in (("logistic", 0), ("mlp", 256)):
        pred = _trained_probe_accuracy(hidden, xtr, ytr, xte, s.probe_steps, s.seed)
        out[name] = float((pred == yte).float().mean())
        out[f"{name}_shape"] = float((pred // n_col == yte // n_col).float().mean())
        out[f"{name}_colour"] = float((pred % n_col == yte % n_col).float().mean())
    speed_data = torch.from_numpy(data.images[: min(s.speed_images, len(data.images))])
    reps = -(-s.speed_images // len(speed_data))
    out["encode_img_s_wall"], out["encode_img_s_cpu"] = _encode_speed(
        encoder, speed_data.repeat(reps, 1, 1, 1)[: s.speed_images]
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--weights", type=Path, default=SMALL_CNN_WEIGHTS)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-steps", type=int, default=400)
    parser.add_argument("--speed-images", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", dest="json_out", type=Path, default=None)
    try:
        s = ProbeSettings(**vars(parser.parse_args(argv)))
    except ValidationError as exc:
        parser.error(str(exc))
    torch.set_num_threads(s.threads)
    results = {
        "random": evaluate(SmallCNNImageEncoder(), s),
        "pretrained": evaluate(SmallCNNImageEncoder.pretrained(s.weights), s),
    }
    base, new = results["random"], results["pretrained"]
    print(f"synthetic shapes, image only: {s.train} train / {s.test} test, seed {s.seed}")
    print(f"{'metric':<22}{'random CNN':>12}{'pretrained':>12}{'ratio':>9}")
    for key in base:
        print(f"{key:<22}{base[key]:>12.4g}{new[key]:>12.4g}{new[key] / base[key]:>8.2f}x")
    if s.json_out is not None:
        s.json_out.write_text(json.dumps({"settings": s.model_dump(mode="json"), **results}))


if __name__ == "__main__":
    main()
