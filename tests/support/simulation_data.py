"""Small, fast inputs for simulator tests: clustered embeddings (no encoders) written as a
pre-encoded EmbeddingSet, and experiment mappings over them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from crossfed.common.data.embeddings import EmbeddingSet


def clustered_embeddings(n: int, classes: int = 4, seed: int = 0) -> EmbeddingSet:
    """Text (16-d) and image (8-d) features around one centre per class, every row paired."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    t_centres = torch.randn(classes, 16, generator=gen)
    i_centres = torch.randn(classes, 8, generator=gen)
    return EmbeddingSet(
        text=t_centres[labels] + 0.8 * torch.randn(n, 16, generator=gen),
        image=i_centres[labels] + 0.8 * torch.randn(n, 8, generator=gen),
        has_text=torch.ones(n, dtype=torch.bool),
        has_image=torch.ones(n, dtype=torch.bool),
        labels=labels,
    )


def write_embeddings(path: Path, n: int = 480, seed: int = 0) -> Path:
    clustered_embeddings(n, seed=seed).save(path)
    return path


def experiment(embeddings: Path, **sections: Any) -> dict[str, Any]:
    """A tiny experiment over ``embeddings``: 4 clients, per-sample rate 0.5, 2 rounds, a
    32-wide network; ``sections`` replace whole top-level sections."""
    doc: dict[str, Any] = {
        "name": "tiny",
        "data": {"kind": "embeddings", "path": str(embeddings)},
        "federation": {
            "clients": 4,
            "dirichlet_alpha": 0.5,
            "missing": {"mode": "per_sample", "rate": 0.5},
            "min_samples_per_client": 20,
        },
        "rounds": {"rounds": 2},
        "train": {"central_epochs": 1},
        "model": {"hidden_dim": 32},
        "methods": ["ours", "zero_fill"],
        "seeds": [0],
        "execution": {"backend": "inline"},
    }
    doc.update(sections)
    return doc
