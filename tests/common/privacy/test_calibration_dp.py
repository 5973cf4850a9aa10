"""DP on the calibration statistics (common/privacy/calibration_dp.py): the sqrt(5)
sensitivity the accounting relies on, the noise scale per tensor, post-processing that the
server's plausibility check accepts, and a server fit that survives non-PSD noisy moments."""

from __future__ import annotations

import math

import pytest
import torch
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.classifier_calibration import (
    MIN_SIGNAL_TO_NOISE,
    CalibrationStats,
    calibrated_state,
    calibration_stats,
    check_client_stats,
    signal_to_noise,
    stats_to_tensors,
)
from crossfed.common.model.network import CrossModalNet
from crossfed.common.privacy.calibration_dp import (
    PATH_SENSITIVITY,
    CalibrationDPError,
    CalibrationDPParams,
    privatize_calibration_stats,
    whole_counts,
)

from tests.support.small_model import tiny_network_config

CFG = tiny_network_config(calibrate_image_classifier=True)


def _data(n: int, seed: int, scale: float = 1.0) -> EmbeddingSet:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return EmbeddingSet(
        text=torch.randn(n, 12, generator=gen),
        image=scale * (3.0 * torch.eye(3, 8)[y] + torch.randn(n, 8, generator=gen)),
        has_text=torch.ones(n, dtype=torch.bool),
        has_image=torch.ones(n, dtype=torch.bool),
        labels=y,
    )


def _units_distance(a: CalibrationStats, b: CalibrationStats, clip: float) -> float:
    """L2 distance of two releases in the mechanism's units (1, C, C^2), count once and the
    outer products' upper triangles, as the module docstring defines the sensitivity."""
    total = float((a.parts["classifier"].count - b.parts["classifier"].count).pow(2).sum())
    for pa, pb in (
        (a.parts["classifier"], b.parts["classifier"]),
        (a.parts["head"], b.parts["head"]),
    ):
        total += float((pa.total - pb.total).pow(2).sum()) / clip**2
        upper = torch.triu(pa.outer - pb.outer)
        total += float(upper.pow(2).sum()) / clip**4
    return math.sqrt(total)


def test_one_sample_moves_a_clipped_release_by_at_most_sqrt5_units() -> None:
    model = CrossModalNet(CFG).eval()
    clip = 0.5  # far below the feature norms: every vector is clipped
    base = _data(20, 1)
    worst = 0.0
    for scale in (0.01, 1.0, 100.0):
        extra = _data(1, 7, scale)
        bigger = EmbeddingSet(
            text=torch.cat([base.text, extra.text]),
            image=torch.cat([base.image, extra.image]),
            has_text=torch.cat([base.has_text, extra.has_text]),
            has_image=torch.cat([base.has_image, extra.has_image]),
            labels=torch.cat([base.labels, extra.labels]),
        )
        a = calibration_stats(model, base, clip_norm=clip)
        b = calibration_stats(model, bigger, clip_norm=clip)
        worst = max(worst, _units_distance(a, b, clip))
    assert worst <= PATH_SENSITIVITY + 1e-9
    # not vacuous: a clipped sample moves the count and both sums by exactly 1 unit each (the
    # upper triangles by less than the Frobenius bound the accounting uses)
    assert worst > math.sqrt(3)
    unclipped = calibration_stats(model, _data(21, 1, 100.0))
    assert float(unclipped.parts["head"].total.norm(dim=1).max()) > 10 * clip  # the clip did bite


def test_noise_scale_and_post_processing() -> None:
    model = CrossModalNet(CFG).eval()
    params = CalibrationDPParams(clip_norm=2.0, noise_multiplier=1.5)
    exact = calibration_stats(model, _data(60, 2), clip_norm=params.clip_norm)
    gen = torch.Generator().manual_seed(0)
    sum_noise, outer_noise = [], []
    for _ in range(200):
        noised = privatize_calibration_stats(exact, params, gen)
        check_client_stats(stats_to_tensors(noised), 60)  # what the server accepts
        assert torch.equal(noised.parts["classifier"].count, noised.parts["head"].count)
        assert torch.equal(noised.parts["head"].outer, noised.parts["head"].outer.transpose(1, 2))
        present = noised.parts["head"].count > 0
        sum_noise.append(
            (noised.parts["head"].total - exact.parts["head"].total)[present].flatten()
        )
        off = ~torch.eye(16, dtype=torch.bool)
        outer_noise.append(
            (noised.parts["head"].outer - exact.parts["head"].outer)[present][:, off].flatten()
        )
    unit = params.noise_unit_std()
    assert unit == pytest.approx(1.5 * math.sqrt(5))
    assert float(torch.cat(sum_noise).std()) == pytest.approx(unit * 2.0, rel=0.05)
    assert float(torch.cat(outer_noise).std()) == pytest.approx(unit * 4.0, rel=0.05)


def test_whole_counts_keep_the_public_total() -> None:
    noisy = torch.tensor([10.4, -3.0, 5.7, 0.2], dtype=torch.float64)
    counts = whole_counts(noisy, 17)
    assert int(counts.sum()) == 17 and bool((counts >= 0).all())
    assert torch.equal(counts, counts.round()) and counts[1] == 0
    assert int(whole_counts(torch.tensor([-1.0, -2.0], dtype=torch.float64), 3).sum()) == 3
    assert not bool(whole_counts(noisy, 0).any())
    with pytest.raises(CalibrationDPError):
        CalibrationDPParams(clip_norm=1.0, noise_multiplier=0.0)


def test_server_fits_through_non_psd_noise_and_refuses_noise_that_swamps_the_means() -> None:
    model = CrossModalNet(CFG).eval()
    state = model.shareable_state_dict()
    params = CalibrationDPParams(4.0, 1.0)
    many = calibration_stats(model, _data(6000, 3), clip_norm=4.0)
    noised = privatize_calibration_stats(many, params, torch.Generator().manual_seed(1))
    _, not_pd = torch.linalg.cholesky_ex(noised.parts["head"].outer)
    assert bool(not_pd.any())  # the raw noisy second moments are not PSD
    assert noised.noise.total == pytest.approx((params.noise_unit_std() * 4.0) ** 2)
    # many rows per class: the class means stand out of the noise, the fit goes ahead
    fitted, what = calibrated_state(CFG, state, noised)
    assert fitted is not None and bool(fitted["head_calibration.ready"]), what
    assert "signal-to-noise" in what
    assert all(bool(torch.isfinite(v).all()) for v in fitted.values() if v.is_floating_point())
    # a handful of rows: the noise is larger than the spread of the means, nothing is fitted
    few = calibration_stats(model, _data(30, 3), clip_norm=4.0)
    swamped = privatize_calibration_stats(few, params, torch.Generator().manual_seed(1))
    fitted, what = calibrated_state(CFG, state, swamped)
    assert fitted is None and "swamps" in what
    assert signal_to_noise(swamped.parts["head"], swamped.noise) < MIN_SIGNAL_TO_NOISE
    assert math.isinf(signal_to_noise(few.parts["head"], few.noise))  # exact statistics
