"""Gaussian mechanism on the per-class projections of eq. 16, applied on the client
before upload: clip each class vector to L2 <= C, then add N(0, (sigma*C)^2) noise.

Sensitivity: one training sample belongs to one class, so it can move only its class
row, and a row confined to the C-ball moves by at most 2C. The release is therefore the
Gaussian mechanism with noise multiplier sigma/2 with respect to that 2C sensitivity;
step the accountant with ``accounting_noise_multiplier(...)``, not with sigma itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class ProjectionDPError(ValueError):
    """Bad projection tensor or DP parameters."""


@dataclass(frozen=True)
class ProjectionDPParams:
    """C (clip_norm) and sigma (noise_multiplier) of the projection mechanism."""

    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ProjectionDPError(f"clip_norm must be a positive number, got {self.clip_norm}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ProjectionDPError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")

    @property
    def noise_std(self) -> float:
        """Per-coordinate standard deviation sigma*C of the added noise."""
        return self.noise_multiplier * self.clip_norm

    @property
    def accounting_noise_multiplier(self) -> float:
        """Noise multiplier relative to the 2C per-sample sensitivity (module docstring)."""
        return self.noise_multiplier / 2.0


def _check_projections(projections: torch.Tensor) -> None:
    if not isinstance(projections, torch.Tensor):
        raise ProjectionDPError(f"projections must be a torch.Tensor, got {type(projections)}")
    if projections.dim() != 2:
        raise ProjectionDPError(
            f"projections must be [num_classes, dim], got shape {tuple(projections.shape)}"
        )
    if not projections.is_floating_point():
        raise ProjectionDPError(f"projections must be floating point, got {projections.dtype}")
    if not torch.isfinite(projections).all():
        raise ProjectionDPError("projections contain NaN or infinite values")


def clip_rows(projections: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale every row with L2 norm > clip_norm down to clip_norm (direction kept)."""
    _check_projections(projections)
    ProjectionDPParams(clip_norm, 0.0)
    norms = projections.norm(dim=1, keepdim=True)
    factor = torch.clamp(clip_norm / norms.clamp_min(1e-12), max=1.0)
    return projections * factor


def privatize_projections(
    projections: torch.Tensor,
    params: ProjectionDPParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Clip each per-class row to ``params.clip_norm`` and add N(0, noise_std^2) to every
    coordinate (all rows, so that which classes a client holds is hidden as well).

    ``generator`` makes the noise reproducible in tests; production callers leave it None.
    """
    clipped = clip_rows(projections, params.clip_norm)
    if params.noise_multiplier == 0:
        return clipped
    noise = torch.randn(
        clipped.shape, generator=generator, dtype=clipped.dtype, device=clipped.device
    )
    return clipped + noise * params.noise_std
