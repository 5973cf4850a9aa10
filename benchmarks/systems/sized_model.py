"""A ModelConfig whose shareable CrossModalNet state is about a requested number of bytes, so
transfer and memory benchmarks move a real model of "100 MB" rather than a synthetic blob."""

from __future__ import annotations

import math
from dataclasses import dataclass

from crossfed.common.model.model_config import ModelConfig
from crossfed.server.model_bootstrap import build_initial_model

from systems.measurement_records import BenchmarkError

TINY_MODEL = {"text_dim": 16, "image_dim": 8, "hidden_dim": 16, "num_classes": 3}


@dataclass(frozen=True)
class SizedModel:
    """The config and the exact byte size of its shareable state."""

    config: ModelConfig
    state_bytes: int


def state_bytes(config: ModelConfig) -> int:
    """Bytes of the shareable state the server would serve for ``config``."""
    state = build_initial_model(config).state
    return sum(t.numel() * t.element_size() for t in state.values())


def model_for_bytes(target_bytes: int, **fixed: int) -> SizedModel:
    """Pick ``hidden_dim`` so the state is close to ``target_bytes`` (size is quadratic in it).

    Three cheap probes at small widths fit size(h) = a h^2 + b h + c exactly (the network's
    layers are linear in h on each side), then the root is checked with one real build.
    """
    if target_bytes <= 0:
        raise BenchmarkError(f"model size must be positive, got {target_bytes} bytes")
    base = ModelConfig(**fixed)  # type: ignore[arg-type]
    probes = (32, 64, 128)
    sizes = [state_bytes(base.model_copy(update={"hidden_dim": h})) for h in probes]
    (h0, h1, h2), (s0, s1, s2) = probes, sizes
    # Newton's divided differences for the quadratic through the three probes
    d01 = (s1 - s0) / (h1 - h0)
    d12 = (s2 - s1) / (h2 - h1)
    a = (d12 - d01) / (h2 - h0)
    b = d01 - a * (h0 + h1)
    c = s0 - a * h0 * h0 - b * h0
    if a <= 0:
        raise BenchmarkError("model size does not grow with hidden_dim; cannot size the model")
    disc = b * b - 4 * a * (c - target_bytes)
    hidden = max(1, round((-b + math.sqrt(max(disc, 0.0))) / (2 * a)))
    config = base.model_copy(update={"hidden_dim": hidden})
    return SizedModel(config, state_bytes(config))
