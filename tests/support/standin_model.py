"""A seeded placeholder global model with the paper network's module names, for server tests
that exercise transport and rounds without building (and importing diffusers for) the real
network. Tests swap it in for `server_app.build_initial_model`; the product has no such mode."""

from __future__ import annotations

import torch
from crossfed.common.model.model_config import ModelConfig
from crossfed.server.model_bootstrap import InitialModel

#: what `InitialModel.source` says for it (the server offers no model bundle for it)
STANDIN_SOURCE = "stand-in"


def standin_state(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """The placeholder state dict: a few small linear layers and one integer buffer."""
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


def _first_component(key: str) -> str:
    return key.split(".", 1)[0]


def standin_model(config: ModelConfig, seed: int = 0) -> InitialModel:
    """Drop-in for `build_initial_model`: the placeholder, one module per first key part."""
    return InitialModel(standin_state(config, seed), _first_component, STANDIN_SOURCE)
