"""The small model every server/client test federates: a few KB of weights, fast to build."""

from __future__ import annotations

from typing import Any

from crossfed.common.model.model_config import ModelConfig

#: `model:` section of a ServerConfig (text/image feature dims, hidden dim, classes).
SMALL_MODEL: dict[str, Any] = {"text_dim": 16, "image_dim": 8, "hidden_dim": 16, "num_classes": 3}


def small_model_config() -> ModelConfig:
    """SMALL_MODEL as the ModelConfig the product builds its network from."""
    return ModelConfig(**SMALL_MODEL)


def tiny_network_config(**overrides: Any) -> ModelConfig:
    """The few-hundred-parameter CrossModalNet the model-level tests train in seconds (12-d
    text, 8-d image, 16 hidden, 3 classes, a 10-step diffusion); ``overrides`` set the rest
    (classes, calibration or classifier flags, memory size, ...)."""
    base: dict[str, Any] = {
        "text_dim": 12,
        "image_dim": 8,
        "hidden_dim": 16,
        "num_classes": 3,
        "diffusion_train_steps": 10,
    }
    return ModelConfig(**{**base, **overrides})
