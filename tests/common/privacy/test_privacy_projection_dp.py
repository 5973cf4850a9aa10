"""Projection DP (eq. 16): clipping and Gaussian noise scale."""

from __future__ import annotations

import pytest
import torch
from crossfed.common.privacy.projection_dp import (
    ProjectionDPError,
    ProjectionDPParams,
    clip_rows,
    privatize_projections,
)


def test_clip_rows_caps_long_rows_and_keeps_short_ones_and_directions() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=g) * torch.tensor([0.1, 5, 0.2, 9, 1, 3, 0.05, 7])[:, None]
    clipped = clip_rows(x, 1.0)
    norms_before, norms_after = x.norm(dim=1), clipped.norm(dim=1)
    long = norms_before > 1.0
    assert long.any() and (~long).any()
    assert torch.allclose(norms_after[long], torch.ones(int(long.sum())), atol=1e-5)
    assert torch.equal(clipped[~long], x[~long])
    cos = torch.nn.functional.cosine_similarity(clipped, x, dim=1)
    assert torch.allclose(cos, torch.ones(8), atol=1e-5)


def test_noise_std_matches_sigma_times_c() -> None:
    params = ProjectionDPParams(clip_norm=2.5, noise_multiplier=1.3)
    zeros = torch.zeros(12, 64)
    g = torch.Generator().manual_seed(7)
    draws = torch.stack([privatize_projections(zeros, params, g) for _ in range(150)])
    noise = draws.flatten()  # 115,200 samples: std error ~0.2%
    assert abs(noise.std().item() / params.noise_std - 1) < 0.02
    assert abs(noise.mean().item()) < 0.02 * params.noise_std
    # the noise is per coordinate and independent: rows are uncorrelated
    corr = torch.corrcoef(draws[:, 0, :5].T)
    assert (corr - torch.eye(5)).abs().max() < 0.3


def test_noise_is_added_after_clipping_and_is_seeded() -> None:
    params = ProjectionDPParams(clip_norm=1.0, noise_multiplier=0.5)
    big = torch.full((3, 4), 100.0)
    a = privatize_projections(big, params, torch.Generator().manual_seed(1))
    b = privatize_projections(big, params, torch.Generator().manual_seed(1))
    c = privatize_projections(big, params, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - clip_rows(big, 1.0)).abs().max() < 6 * params.noise_std  # not 100-scale
    exact = privatize_projections(big, ProjectionDPParams(1.0, 0.0))
    assert torch.allclose(exact.norm(dim=1), torch.ones(3))


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(ProjectionDPError, match="clip_norm"):
        ProjectionDPParams(clip_norm=0, noise_multiplier=1)
    with pytest.raises(ProjectionDPError, match="noise_multiplier"):
        ProjectionDPParams(clip_norm=1, noise_multiplier=-1)
    params = ProjectionDPParams(1, 1)
    with pytest.raises(ProjectionDPError, match=r"\[num_classes, dim\]"):
        privatize_projections(torch.zeros(3), params)
    with pytest.raises(ProjectionDPError, match="NaN"):
        privatize_projections(torch.tensor([[float("nan"), 0.0]]), params)
    with pytest.raises(ProjectionDPError, match="floating point"):
        privatize_projections(torch.zeros(2, 2, dtype=torch.int64), params)
    assert params.accounting_noise_multiplier == 0.5
