"""Central DP on aggregated updates: clipping of whole deltas and noise std z*C/n."""

from __future__ import annotations

import pytest
import torch
from crossfed.common.privacy.central_dp import (
    CentralDPError,
    add_central_noise,
    central_noise_std,
    clip_update,
    effective_clients,
    update_l2_norm,
)


def test_clip_update_uses_global_norm_across_tensors() -> None:
    update = {"a": torch.full((3,), 3.0), "b": torch.full((2, 2), 2.0)}
    norm = update_l2_norm(update)
    assert norm == pytest.approx((27 + 16) ** 0.5)
    clipped = clip_update(update, 1.0)
    assert clipped.was_clipped and clipped.original_norm == pytest.approx(norm)
    assert update_l2_norm(clipped.delta) == pytest.approx(1.0, rel=1e-6)
    ratio = clipped.delta["a"][0] / clipped.delta["b"][0, 0]
    assert ratio.item() == pytest.approx(1.5)  # direction kept
    small = clip_update({"a": torch.tensor([0.1, 0.2])}, 1.0)
    assert not small.was_clipped and torch.equal(small.delta["a"], torch.tensor([0.1, 0.2]))


def test_noise_std_is_z_c_over_n() -> None:
    avg = {"w": torch.zeros(200, 300), "b": torch.zeros(50)}
    g = torch.Generator().manual_seed(3)
    noised = add_central_noise(
        avg, clip_norm=0.8, noise_multiplier=1.2, clients_per_round=4, generator=g
    )
    expected = 1.2 * 0.8 / 4
    assert central_noise_std(0.8, 1.2, 4) == pytest.approx(expected)
    assert noised["w"].std().item() == pytest.approx(expected, rel=0.02)
    assert noised["b"].shape == (50,)
    assert torch.equal(add_central_noise(avg, 1.0, 0.0, 4)["w"], avg["w"])


def test_effective_clients_for_weighted_mean_and_errors() -> None:
    assert effective_clients([1, 1, 1, 1]) == pytest.approx(4)
    assert effective_clients([100, 10, 10]) == pytest.approx(1.2)
    with pytest.raises(CentralDPError):
        effective_clients([])
    with pytest.raises(CentralDPError, match="clip_norm"):
        clip_update({"a": torch.ones(2)}, 0)
    with pytest.raises(CentralDPError, match="NaN"):
        update_l2_norm({"a": torch.tensor([float("inf")])})
    with pytest.raises(CentralDPError, match="floating point"):
        update_l2_norm({"a": torch.ones(2, dtype=torch.int32)})
