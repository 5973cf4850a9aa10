"""Optional central DP on aggregated updates (DP-FedAvg style, server side): clip each
client's update delta to global L2 <= C, average, add N(0, (z*C/n)^2) per coordinate.

The noise std z*C/n matches the sensitivity C/n of an *unweighted* mean of n clipped
deltas. Eq. 15 weights clients by |D_i|; with weights w_i (sum 1) the sensitivity is
max_i w_i * C, so pass ``clients_per_round = 1 / max_i w_i`` (``effective_clients``)
rather than the raw count, or average uniformly when central DP is on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


class CentralDPError(ValueError):
    """Invalid clipping/noise parameters or update tensors."""


@dataclass(frozen=True)
class ClippedUpdate:
    """A client's update delta after clipping, with its norm before clipping."""

    delta: dict[str, torch.Tensor]
    original_norm: float
    scale: float

    @property
    def was_clipped(self) -> bool:
        return self.scale < 1.0


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise CentralDPError(f"{name} must be {bound}, got {value}")


def update_l2_norm(update: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm over all tensors of an update (float64 accumulation)."""
    if not update:
        raise CentralDPError("update is empty")
    total = 0.0
    for name, tensor in update.items():
        if not tensor.is_floating_point():
            raise CentralDPError(f"update tensor {name!r} is {tensor.dtype}, not floating point")
        value = float(tensor.detach().to(torch.float64).pow(2).sum())
        if not math.isfinite(value):
            raise CentralDPError(f"update tensor {name!r} contains NaN or infinite values")
        total += value
    return math.sqrt(total)


def clip_update(update: Mapping[str, torch.Tensor], clip_norm: float) -> ClippedUpdate:
    """Scale the whole update so that its global L2 norm is at most ``clip_norm``."""
    _check_positive("clip_norm", clip_norm)
    norm = update_l2_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    delta = {name: tensor.detach() * scale for name, tensor in update.items()}
    return ClippedUpdate(delta=delta, original_norm=norm, scale=scale)


def central_noise_std(clip_norm: float, noise_multiplier: float, clients_per_round: float) -> float:
    """Per-coordinate std z*C/n of the noise added to the mean of n clipped updates."""
    _check_positive("clip_norm", clip_norm)
    _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    _check_positive("clients_per_round", clients_per_round)
    return noise_multiplier * clip_norm / clients_per_round


def effective_clients(weights: Sequence[float]) -> float:
    """1 / max normalised weight: the n to use for a weighted mean (module docstring)."""
    if not weights or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise CentralDPError("weights must be non-negative, finite and not all zero")
    total = float(sum(weights))
    return total / max(weights)


def add_central_noise(
    average: Mapping[str, torch.Tensor],
    clip_norm: float,
    noise_multiplier: float,
    clients_per_round: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The averaged clipped delta plus Gaussian noise of std z*C/n on every coordinate."""
    std = central_noise_std(clip_norm, noise_multiplier, clients_per_round)
    noised: dict[str, torch.Tensor] = {}
    for name, tensor in average.items():
        if not tensor.is_floating_point():
            raise CentralDPError(f"average tensor {name!r} is {tensor.dtype}, not floating point")
        if std == 0:
            noised[name] = tensor.detach().clone()
            continue
        noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        noised[name] = tensor.detach() + noise.to(tensor.device) * std
    return noised
