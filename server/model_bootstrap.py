"""The initial global model and its key -> module map: the paper's network
(`crossfed.common.model.network.CrossModalNet`) built from the ModelConfig."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from crossfed.common.model.model_config import ModelConfig


@dataclass(frozen=True)
class InitialModel:
    """What the round engine needs to start a run."""

    state: dict[str, torch.Tensor]
    module_of: Callable[[str], str]
    source: str  # "CrossModalNet" (tests may inject other models under other names)


def model_config_digest(config: ModelConfig) -> str:
    """SHA-256 (hex) of the canonical JSON of the ModelConfig (RegisterRequest field)."""
    return hashlib.sha256(config.model_dump_json().encode("utf-8")).hexdigest()


def build_initial_model(config: ModelConfig, seed: int = 0) -> InitialModel:
    """Seeded, deterministic initial global model (same seed + config -> same bytes)."""
    # imported here: the network pulls in diffusers, which only building a model needs
    from crossfed.common.model.model_construction import seeded_model

    net = seeded_model(config, seed)
    state = {k: v.detach().clone().contiguous() for k, v in net.shareable_state_dict().items()}
    return InitialModel(state, net.module_of, "CrossModalNet")
