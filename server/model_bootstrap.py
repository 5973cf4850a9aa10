"""The initial global model and its key -> module map, built from the ModelConfig.

Uses the paper's network (`crossfed.common.model.network.CrossModalNet`) when it is
available; otherwise, only when asked for (``allow_standin``), a seeded stand-in state
dict with the same module names, so transport and rounds can be exercised end to end.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from crossfed.common.model.model_config import ModelConfig
from crossfed.server.errors import ConfigurationError

STANDIN_MODULES = ("disentangler", "mapper", "diffusion", "fusion", "head")


@dataclass(frozen=True)
class InitialModel:
    """What the round engine needs to start a run."""

    state: dict[str, torch.Tensor]
    module_of: Callable[[str], str]
    source: str  # "CrossModalNet" or "stand-in"


def model_config_digest(config: ModelConfig) -> str:
    """SHA-256 (hex) of the canonical JSON of the ModelConfig (RegisterRequest field)."""
    return hashlib.sha256(config.model_dump_json().encode("utf-8")).hexdigest()


def _first_component(key: str) -> str:
    return key.split(".", 1)[0]


def _standin_state(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, dt, di, c = config.hidden_dim, config.text_dim, config.image_dim, config.num_classes

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    return {
        "disentangler.weight": w(2 * di, di),
        "disentangler.bias": torch.zeros(2 * di),
        "mapper.weight": w(dt, di),
        "mapper.bias": torch.zeros(dt),
        "diffusion.weight": w(di, dt + di),
        "diffusion.bias": torch.zeros(di),
        "fusion.weight": w(h, 2 * dt + 2 * di),
        "fusion.bias": torch.zeros(h),
        "fusion.steps": torch.zeros((), dtype=torch.int64),
        "head.weight": w(c, h),
        "head.bias": torch.zeros(c),
    }


def build_initial_model(
    config: ModelConfig, seed: int = 0, allow_standin: bool = False
) -> InitialModel:
    """Seeded, deterministic initial global model (same seed + config -> same bytes)."""
    try:
        network = importlib.import_module("crossfed.common.model.network")
    except ModuleNotFoundError as exc:
        if exc.name is not None and not exc.name.startswith("crossfed.common.model.network"):
            raise
        if not allow_standin:
            raise ConfigurationError(
                "the model network (crossfed.common.model.network) is not available in this "
                "build; start with --standin-model to run rounds with a placeholder model"
            ) from exc
        return InitialModel(_standin_state(config, seed), _first_component, "stand-in")
    with torch.random.fork_rng(devices=[]):  # seed without disturbing the caller's RNG
        torch.manual_seed(seed)
        net = network.CrossModalNet(config)
    state = {k: v.detach().clone().contiguous() for k, v in net.shareable_state_dict().items()}
    return InitialModel(state, net.module_of, "CrossModalNet")
