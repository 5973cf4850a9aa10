"""Central quality benchmark: does cross-modal recovery close the missing-modality gap?

On the built-in synthetic-shapes dataset (held-out test split, all test samples paired), with
a fraction of *training* samples missing one modality (per-sample / PmcmFL style: half
text-only, half image-only), trains centrally and reports accuracy for each Table I inference
configuration of
  (a) ours: CrossModalNet with the paper's recovery (mapper / diffusion / VLMR),
  (b) the best zero-fill baseline: same fusion architecture, missing slots zero-filled,
      trained with and without random modality dropout, the better one per configuration,
  (c) the unimodal ceiling: the same network trained on one modality alone, using every
      training sample that has it,
and gap-closure = (a - b) / (c - b) per missing configuration, mean +- std over seeds. Also
training throughput on cached embeddings and the speed-up of a cached over a cold run.

Run: ``python benchmarks/central_quality.py [--seeds 0 1 2] [--epochs 10] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from crossfed.client.local_trainer import TrainConfig, train_local
from crossfed.common.data.embedding_cache import EmbeddingCache, encode_dataset
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.data.missingness import per_sample_masks
from crossfed.common.data.synthetic_shapes import SyntheticShapesConfig, generate_synthetic_shapes
from crossfed.common.model.encoders import build_image_encoder, build_text_encoder
from crossfed.common.model.evaluation import evaluate
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet
from pydantic import BaseModel, ConfigDict, Field

CONFIGS = ("both", "text_only", "image_only")


class BenchmarkSettings(BaseModel):
    """Validated command-line input."""

    model_config = ConfigDict(extra="forbid")

    samples: int = Field(20_000, gt=100)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    missing_rate: float = Field(0.5, ge=0, le=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(512, gt=0)
    lr: float = Field(2e-3, gt=0)
    dropout: float = Field(0.5, ge=0, le=1, description="modality dropout for (a) and (b)")
    text_recovery: str = Field("diffusion", pattern="^(diffusion|memory)$")
    train_recovery_steps: int | None = Field(None, gt=0)
    sample_steps: int = Field(10, gt=0, description="DDIM steps of f^_i recovery at inference")
    threads: int = Field(2, gt=0)
    cache_dir: Path = Path(".crossfed/cache")
    cold_samples: int = Field(2000, ge=0, description="subset for cold-vs-cached timing; 0: skip")
    embeddings: Path | None = Field(None, description="precomputed EmbeddingSet; skips encoding")
    json_out: Path | None = None
    progress: bool = True


@dataclass
class Run:
    """One trained variant's test scores and training speed."""

    scores: dict[str, dict[str, float]]
    samples_per_second: float


def load_embeddings(s: BenchmarkSettings) -> tuple[EmbeddingSet, dict[str, float]]:
    """Dataset embeddings via the cache, plus a cold-vs-cached timing on a fresh cache."""
    if s.embeddings is not None:
        return EmbeddingSet.load(s.embeddings), {}
    text_enc, image_enc = build_text_encoder(), build_image_encoder()
    raw = generate_synthetic_shapes(SyntheticShapesConfig(num_samples=s.samples, seed=0))
    data = encode_dataset(raw, text_enc, image_enc, EmbeddingCache(s.cache_dir), s.progress)
    if s.cold_samples == 0:
        return data, {}
    sub = raw.subset(np.arange(min(s.cold_samples, len(raw))))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        encode_dataset(sub, text_enc, image_enc, EmbeddingCache(tmp), False)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        encode_dataset(sub, text_enc, image_enc, EmbeddingCache(tmp), False)
        warm = time.perf_counter() - t0
    return data, {
        "cold_encode_s": cold,
        "cached_load_s": warm,
        "subset": float(len(sub)),
        "speedup": cold / warm,
    }


def split(data: EmbeddingSet, s: BenchmarkSettings, seed: int) -> tuple[EmbeddingSet, EmbeddingSet]:
    """Seeded train/test split; training samples lose a modality at missing_rate."""
    order = torch.from_numpy(np.random.default_rng(1000 + seed).permutation(len(data)))
    n_test = int(len(data) * s.test_fraction)
    test, train = data.subset(order[:n_test]), data.subset(order[n_test:])
    masks = per_sample_masks(len(train), s.missing_rate, seed)
    return train.with_masks(
        torch.from_numpy(masks.has_text), torch.from_numpy(masks.has_image)
    ), test


def only(data: EmbeddingSet, modality: str) -> EmbeddingSet:
    """Every sample that has `modality`, with the other modality hidden."""
    keep = data.has_text if modality == "text" else data.has_image
    sub = data.subset(keep.nonzero().squeeze(1))
    none = torch.zeros(len(sub), dtype=torch.bool)
    return sub.with_masks(
        sub.has_text if modality == "text" else none, sub.has_image if modality == "image" else none
    )


def train_variant(
    cfg: ModelConfig,
    train: EmbeddingSet,
    test: EmbeddingSet,
    s: BenchmarkSettings,
    seed: int,
    dropout: float,
) -> Run:
    torch.manual_seed(seed)
    model = CrossModalNet(cfg)
    tc = TrainConfig(
        epochs=s.epochs,
        batch_size=s.batch_size,
        lr=s.lr,
        seed=seed,
        modality_dropout=dropout,
        train_recovery_steps=s.train_recovery_steps,
    )
    res = train_local(model, train, tc, progress=s.progress)
    return Run(evaluate(model, test), res.samples_per_second)


def one_seed(data: EmbeddingSet, s: BenchmarkSettings, seed: int) -> dict[str, Any]:
    train, test = split(data, s, seed)
    base = ModelConfig(
        text_dim=data.text_dim,
        image_dim=data.image_dim,
        num_classes=int(data.labels.max()) + 1,
        text_only_recovery=s.text_recovery,
        diffusion_sample_steps=s.sample_steps,
    )
    zero = base.model_copy(update={"missing_fill": "zero"})
    ours = train_variant(base, train, test, s, seed, s.dropout)
    zero_plain = train_variant(zero, train, test, s, seed, 0.0)
    zero_drop = train_variant(zero, train, test, s, seed, s.dropout)
    ceil_text = train_variant(zero, only(train, "text"), test, s, seed, 0.0)
    ceil_image = train_variant(zero, only(train, "image"), test, s, seed, 0.0)
    out: dict[str, Any] = {
        "seed": seed,
        "train_counts": train.counts(),
        "ours_samples_per_s": ours.samples_per_second,
        "zero_fill_samples_per_s": zero_plain.samples_per_second,
    }
    for c in CONFIGS:
        a = ours.scores[c]["accuracy"]
        b_plain, b_drop = zero_plain.scores[c]["accuracy"], zero_drop.scores[c]["accuracy"]
        b = max(b_plain, b_drop)
        ceiling = {
            "both": float("nan"),
            "text_only": ceil_text.scores[c]["accuracy"],
            "image_only": ceil_image.scores[c]["accuracy"],
        }[c]
        gap = (a - b) / (ceiling - b) if c != "both" and ceiling != b else float("nan")
        out[c] = {
            "ours": a,
            "ours_macro_f1": ours.scores[c]["macro_f1"],
            "baseline": b,
            "baseline_variant": "dropout" if b_drop >= b_plain else "plain",
            "baseline_plain": b_plain,
            "baseline_dropout": b_drop,
            "ceiling": ceiling,
            "gap_closure": gap,
        }
    return out


def mean_std(values: list[float]) -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "n/a"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} ± {sd:.3f}"


def report(runs: list[dict[str, Any]], timing: dict[str, float], s: BenchmarkSettings) -> str:
    def col(c: str, key: str) -> list[float]:
        return [float(r[c][key]) for r in runs]

    lines = [
        (
            f"Missingness: per sample (PmcmFL), rate {s.missing_rate} of training samples "
            f"(half text-only, half image-only); central training (1 client, no Dirichlet split); "
            f"test set fully paired; seeds {s.seeds}; {s.epochs} epochs; modality dropout "
            f"{s.dropout} for ours and the dropout baseline; text-only recovery: {s.text_recovery}."
        ),
        "",
        (
            "| configuration | ours (a) | best zero-fill (b) | ceiling (c) | ours / (b) | "
            "gap-closure (a-b)/(c-b) |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for c in CONFIGS:
        ratio = [a / b for a, b in zip(col(c, "ours"), col(c, "baseline"))]
        lines.append(
            f"| {c} | {mean_std(col(c, 'ours'))} | {mean_std(col(c, 'baseline'))} | "
            f"{mean_std(col(c, 'ceiling'))} | {mean_std(ratio)} | "
            f"{mean_std(col(c, 'gap_closure'))} |"
        )
    ours_sps = [float(r["ours_samples_per_s"]) for r in runs]
    zero_sps = [float(r["zero_fill_samples_per_s"]) for r in runs]
    lines += [
        "",
        (
            f"Training throughput on cached embeddings (batch {s.batch_size}, {s.threads} threads): "
            f"ours {statistics.median(ours_sps):,.0f} samples/s, zero-fill baseline "
            f"{statistics.median(zero_sps):,.0f} samples/s (ratio "
            f"{statistics.median(ours_sps) / statistics.median(zero_sps):.2f})."
        ),
    ]
    if timing:
        lines.append(
            f"Encoding {int(timing['subset'])} samples cold: {timing['cold_encode_s']:.2f} s; from "
            f"cache: {timing['cached_load_s']:.3f} s; cached run is {timing['speedup']:.0f}x faster."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--missing-rate", type=float, default=0.5)
    parser.add_argument("--text-recovery", default="memory", choices=["diffusion", "memory"])
    parser.add_argument("--train-recovery-steps", type=int, default=None)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=Path(".crossfed/cache"))
    parser.add_argument("--cold-samples", type=int, default=2000)
    parser.add_argument("--embeddings", type=Path, default=None)
    parser.add_argument("--json", dest="json_out", type=Path, default=None)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = vars(parser.parse_args(argv))
    s = BenchmarkSettings(**args)
    torch.set_num_threads(s.threads)
    data, timing = load_embeddings(s)
    runs = []
    for seed in s.seeds:
        runs.append(one_seed(data, s, seed))
        print(
            f"seed {seed} done: "
            + ", ".join(
                f"{c} ours {runs[-1][c]['ours']:.3f} base {runs[-1][c]['baseline']:.3f} "
                f"ceil {runs[-1][c]['ceiling']:.3f}"
                for c in CONFIGS
            ),
            flush=True,
        )
    print(report(runs, timing, s))
    if s.json_out is not None:
        s.json_out.parent.mkdir(parents=True, exist_ok=True)
        s.json_out.write_text(
            json.dumps(
                {"settings": s.model_dump(mode="json"), "runs": runs, "timing": timing}, indent=2
            )
        )


if __name__ == "__main__":
    main()
