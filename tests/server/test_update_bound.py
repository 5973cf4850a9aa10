"""The update bound's measurement: distances summed over parts agree with a float64 reference,
and an update near the float32 maximum (where a float32 difference overflows) still gets a
finite distance and a clip factor that brings it back to the bound."""

from __future__ import annotations

import math

import pytest
import torch
from crossfed.server import update_bound
from crossfed.server.update_bound import UpdateBound, UpdateBounder


def _reference_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))


def test_distance_over_parts_matches_a_float64_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(update_bound, "_PART_ELEMENTS", 1000)  # many parts, one partial
    gen = torch.Generator().manual_seed(0)
    g = {"w": torch.randn(70, 57, generator=gen), "b": torch.randn(13, generator=gen)}
    u = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in g.items()}
    check = UpdateBounder(g, UpdateBound(0.5)).check(u, ["w", "b"])
    assert math.isclose(check.distance, _reference_distance(u, g), rel_tol=1e-6)
    assert math.isclose(
        check.reference, _reference_distance(g, {k: 0 * v for k, v in g.items()}), rel_tol=1e-6
    )
    assert not check.clipped and check.scale == 1.0


def test_an_update_near_the_float32_maximum_gets_a_finite_distance_and_is_clipped() -> None:
    g = {"w": torch.full((64,), -3e38)}
    u = {"w": torch.full((64,), 3e38)}  # u - g overflows float32
    assert not math.isfinite(float(torch.dist(u["w"], g["w"])))
    check = UpdateBounder(g, UpdateBound(0.5)).check(u, ["w"])
    assert math.isfinite(check.distance)
    assert math.isclose(check.distance, 6e38 * 8, rel_tol=1e-6)
    assert check.clipped and math.isclose(check.scale * check.distance, check.limit, rel_tol=1e-9)
