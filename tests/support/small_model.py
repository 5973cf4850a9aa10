"""The small model every server/client test federates: a few KB of weights, fast to build."""

from __future__ import annotations

from typing import Any

from crossfed.common.model.model_config import ModelConfig

#: `model:` section of a ServerConfig (text/image feature dims, hidden dim, classes).
SMALL_MODEL: dict[str, Any] = {"text_dim": 16, "image_dim": 8, "hidden_dim": 16, "num_classes": 3}


def small_model_config() -> ModelConfig:
    """SMALL_MODEL as the ModelConfig the product builds its network from."""
    return ModelConfig(**SMALL_MODEL)
