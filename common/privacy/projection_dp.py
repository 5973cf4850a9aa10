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


#: Chance that an honest release (noise at least as large as mandated) fails `noise_present`.
NOISE_CHECK_FALSE_REFUSAL = 1e-9


@dataclass(frozen=True)
class ProjectionMandate:
    """What a server requires of every projection release (eq. 16) and the budget it keeps:
    rows clipped to ``clip_norm`` and Gaussian noise of at least ``noise_multiplier`` *
    ``clip_norm``, epsilon accounted at ``delta``, releases refused past ``epsilon_budget``."""

    noise_multiplier: float
    clip_norm: float
    delta: float
    epsilon_budget: float | None = None

    def __post_init__(self) -> None:
        ProjectionDPParams(self.clip_norm, self.noise_multiplier)
        if not self.noise_multiplier > 0:
            raise ProjectionDPError("a mandate needs noise_multiplier > 0")
        if not 0 < self.delta < 1:
            raise ProjectionDPError(f"delta must be in (0, 1), got {self.delta}")
        budget = self.epsilon_budget
        if budget is not None and not (math.isfinite(budget) and budget > 0):
            raise ProjectionDPError(f"epsilon_budget must be a positive number, got {budget}")

    @property
    def params(self) -> ProjectionDPParams:
        return ProjectionDPParams(self.clip_norm, self.noise_multiplier)

    def satisfied_by(self, params: ProjectionDPParams) -> bool:
        """Whether a release made with ``params`` is at least as private as the mandate: rows
        clipped no wider and noise no smaller (then sigma/2 against the 2C sensitivity of the
        mandate's C bounds the release's own noise multiplier from below)."""
        return params.clip_norm <= self.clip_norm * (
            1 + 1e-9
        ) and params.noise_std >= self.params.noise_std * (1 - 1e-9)


def released_modalities(text_count: torch.Tensor, image_count: torch.Tensor) -> int:
    """Gaussian releases in one projection payload: one per modality with a class present.
    A paired sample moves its class's text row and image row, so a client holding both
    releases two mechanisms per round (composition; accounted as two steps)."""
    return int(bool((text_count > 0).any())) + int(bool((image_count > 0).any()))


def noise_present(rows: torch.Tensor, noise_std: float) -> bool:
    """Whether released ``rows`` (clipped means plus noise) carry at least N(0, noise_std^2)
    per coordinate: their sum of squares over noise_std^2 is at least a chi-square with one
    degree of freedom per value, so an honest release falls below its
    NOISE_CHECK_FALSE_REFUSAL quantile with that (negligible) chance; exact means do not
    reach it."""
    from scipy.stats import chi2

    values = rows.to(torch.float64).reshape(-1)
    if values.numel() == 0 or noise_std <= 0:
        return True
    statistic = float(values.pow(2).sum()) / noise_std**2
    return statistic >= float(chi2.ppf(NOISE_CHECK_FALSE_REFUSAL, values.numel()))
