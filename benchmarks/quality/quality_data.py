"""Benchmark data: synthetic shapes encoded once through the embedding cache, a held-out
paired test split, a Dirichlet(alpha) label partition over clients and missing modalities
simulated per sample (PmcmFL) or per client (FedMultimodal)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.data.label_partition import dirichlet_partition
from crossfed.common.data.missingness import (
    apply_client_modalities,
    per_client_modalities,
    per_sample_masks,
)

from quality.quality_errors import QualityBenchmarkError

Missingness = Literal["per_sample", "per_client"]


@dataclass(frozen=True)
class FederationSetup:
    """One point of the grid: how modalities go missing, how labels split, which seed."""

    missingness: Missingness
    rate: float
    alpha: float
    clients: int
    seed: int

    def label(self) -> str:
        return (
            f"{self.missingness} rate={self.rate:g} alpha={self.alpha:g} "
            f"clients={self.clients} seed={self.seed}"
        )


@dataclass
class FederatedData:
    """Client shards (modalities already hidden), the paired test split, the training set
    with the same masks (unimodal ceilings) and without them (central paired upper bound)."""

    shards: list[EmbeddingSet]
    train: EmbeddingSet
    full_train: EmbeddingSet
    test: EmbeddingSet
    client_modalities: list[str]


def load_benchmark_embeddings(samples: int, cache_dir: Path, progress: bool) -> EmbeddingSet:
    """Encode the built-in synthetic shapes ONCE with the default frozen encoders (eq. 1) via
    the embedding cache; later runs (and worker processes) read one assembled file."""
    from crossfed.common.data.embedding_cache import EmbeddingCache, encode_dataset
    from crossfed.common.data.synthetic_shapes import (
        SyntheticShapesConfig,
        generate_synthetic_shapes,
    )
    from crossfed.common.model.encoders import build_image_encoder, build_text_encoder

    text_enc, image_enc = build_text_encoder(), build_image_encoder()
    key = hashlib.sha256(f"{samples}|{text_enc.identity}|{image_enc.identity}".encode())
    assembled = cache_dir / f"quality-shapes-{key.hexdigest()[:16]}.safetensors"
    if assembled.is_file():
        return EmbeddingSet.load(assembled)
    raw = generate_synthetic_shapes(SyntheticShapesConfig(num_samples=samples, seed=0))
    data = encode_dataset(raw, text_enc, image_enc, EmbeddingCache(cache_dir), progress)
    data.save(assembled)
    return data


def split_train_test(
    data: EmbeddingSet, test_fraction: float, seed: int
) -> tuple[EmbeddingSet, EmbeddingSet]:
    """Seeded held-out split; the test split keeps both modalities (Table I is evaluated by
    hiding one at inference)."""
    if not 0.0 < test_fraction < 1.0:
        raise QualityBenchmarkError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = torch.from_numpy(np.random.default_rng(1000 + seed).permutation(len(data)))
    n_test = int(len(data) * test_fraction)
    return data.subset(order[n_test:]), data.subset(order[:n_test])


def _kind(has_t: bool, has_i: bool) -> str:
    return "both" if has_t and has_i else "text" if has_t else "image"


def build_federation(
    data: EmbeddingSet, setup: FederationSetup, test_fraction: float
) -> FederatedData:
    """Split, partition labels by Dirichlet(alpha) and hide modalities per the setup."""
    if setup.clients < 1:
        raise QualityBenchmarkError(f"clients must be >= 1, got {setup.clients}")
    train, test = split_train_test(data, test_fraction, setup.seed)
    labels = train.labels.numpy()
    parts = dirichlet_partition(labels, setup.clients, setup.alpha, setup.seed, min_samples=20)
    if setup.missingness == "per_sample":
        masks = per_sample_masks(len(train), setup.rate, setup.seed)
        kinds = ["mixed"] * setup.clients
    elif setup.missingness == "per_client":
        mods = per_client_modalities(setup.clients, setup.rate, setup.seed)
        masks = apply_client_modalities(parts, mods, len(train))
        kinds = [_kind(t, i) for t, i in mods]
    else:
        raise QualityBenchmarkError(
            f"missingness must be 'per_sample' or 'per_client', got {setup.missingness!r}"
        )
    masked = train.with_masks(torch.from_numpy(masks.has_text), torch.from_numpy(masks.has_image))
    shards = [masked.subset(torch.from_numpy(p)) for p in parts]
    return FederatedData(
        shards=shards, train=masked, full_train=train, test=test, client_modalities=kinds
    )


def only_modality(data: EmbeddingSet, modality: Literal["text", "image"]) -> EmbeddingSet:
    """Every sample that has `modality`, with the other hidden (unimodal ceiling's data)."""
    keep = data.has_text if modality == "text" else data.has_image
    sub = data.subset(keep.nonzero().squeeze(1))
    none = torch.zeros(len(sub), dtype=torch.bool)
    return sub.with_masks(
        sub.has_text if modality == "text" else none,
        sub.has_image if modality == "image" else none,
    )


def shards_with(
    shards: list[EmbeddingSet], modality: Literal["text", "image"]
) -> list[EmbeddingSet]:
    """Each client's rows holding `modality` (the other hidden); clients without any drop out."""
    kept = [only_modality(s, modality) for s in shards]
    return [s for s in kept if len(s)]
