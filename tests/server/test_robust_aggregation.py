"""Robust aggregators (median, trimmed mean, Krum): resistance to scaled / sign-flipped
uploads where FedAvg collapses, module-awareness, and the memory refusal."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from crossfed.common.config import StrategyConfig
from crossfed.server.errors import InvalidUpdateError
from crossfed.server.strategies import robust_aggregation
from crossfed.server.strategies.base import RoundAggregator, Strategy
from crossfed.server.strategies.registry import make_strategy
from crossfed.server.strategies.robust_aggregation import (
    AnchoredMeanStrategy,
    KrumStrategy,
    MedianStrategy,
    MemoryBudgetError,
    RobustStrategy,
    TrimmedMeanStrategy,
    buffered_peak_bytes,
)
from scipy import stats

from tests.support.weighted_mean_strategy import WeightedMeanStrategy, module_of_prefix

State = dict[str, torch.Tensor]
ALL = {"enc": 1.0, "head": 1.0}


def global_state() -> State:
    gen = torch.Generator().manual_seed(3)
    return {
        "enc.weight": torch.randn(16, 8, generator=gen),
        "enc.bias": torch.randn(16, generator=gen),
        "head.weight": torch.randn(3, 16, generator=gen),
        "head.count": torch.tensor(5, dtype=torch.int64),
    }


def honest_uploads(g: State, n: int, seed: int = 0, noise: float = 0.01) -> list[State]:
    """Clients that agree on a direction d (norm ~0.1 per coordinate), up to small noise."""
    gen = torch.Generator().manual_seed(seed)
    direction = {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in g.items()}
    return [
        {
            k: v + direction[k] + noise * torch.randn(v.shape, generator=gen)
            if v.is_floating_point()
            else v
            for k, v in g.items()
        }
        for _ in range(n)
    ]


def attacked(g: State, upload: State, attack: str) -> State:
    factor = {"scaled": 100.0, "sign_flipped": -1.0, "scaled_sign_flipped": -100.0}[attack]
    return {
        k: g[k] + factor * (v - g[k]) if v.is_floating_point() else v for k, v in upload.items()
    }


def aggregate(
    strategy: RobustStrategy | WeightedMeanStrategy,
    g: State,
    uploads: list[State],
    weights: list[dict[str, float]] | None = None,
    scale: float = 1.0,
) -> tuple[State, frozenset[str], dict[str, float]]:
    agg = strategy.begin_round(g, module_of_prefix)
    for i, upload in enumerate(uploads):
        agg.add(upload, weights[i] if weights else ALL, num_samples=10, scale=scale)
    result = agg.result()
    return strategy.finish_round(g, result), result.trained_modules, result.values


def distance(a: State, b: State) -> float:
    return float(
        sum((a[k].double() - b[k].double()).pow(2).sum() for k in a if a[k].is_floating_point())
        ** 0.5
    )


def mean_of(uploads: list[State]) -> State:
    return {
        k: torch.stack([u[k] for u in uploads]).mean(dim=0) if v.is_floating_point() else v
        for k, v in uploads[0].items()
    }


ROBUST: dict[str, Callable[[], RobustStrategy]] = {
    "median": MedianStrategy,
    "trimmed_mean": lambda: TrimmedMeanStrategy(trim_ratio=0.2),
    "krum": lambda: KrumStrategy(num_byzantine=2, num_selected=1),
    "multi_krum": lambda: KrumStrategy(num_byzantine=2, num_selected=4),
    "anchored_mean": AnchoredMeanStrategy,
}


@pytest.mark.parametrize("attack", ["scaled", "sign_flipped", "scaled_sign_flipped"])
@pytest.mark.parametrize("name", sorted(ROBUST))
def test_two_of_ten_attackers_are_resisted_where_fedavg_is_not(name: str, attack: str) -> None:
    g = global_state()
    honest = honest_uploads(g, 10, seed=0)
    uploads = [attacked(g, u, attack) for u in honest[:2]] + honest[2:]
    target = mean_of(honest[2:])
    step = distance(target, g)  # size of the honest round's update
    robust, _, _ = aggregate(ROBUST[name](), g, uploads)
    fedavg, _, _ = aggregate(WeightedMeanStrategy(), g, uploads)
    assert distance(robust, target) < 0.1 * step, f"{name} moved by the {attack} uploads"
    assert distance(fedavg, target) > 0.35 * step, "FedAvg should be visibly pulled away"
    assert distance(fedavg, target) > 4 * distance(robust, target)


@pytest.mark.parametrize("attack", ["scaled", "sign_flipped"])
def test_multi_krum_from_the_registry_averages_exactly_the_honest_uploads(attack: str) -> None:
    """`multi_krum` keeps all but f uploads: with f = 2 attackers it drops exactly them and
    averages the other eight (Krum alone keeps one upload and throws the rest away)."""
    g = global_state()
    honest = honest_uploads(g, 10, seed=5)
    uploads = [attacked(g, u, attack) for u in honest[:2]] + honest[2:]
    strategy = make_strategy(StrategyConfig(name="multi_krum", krum_f=2))
    assert isinstance(strategy, RobustStrategy) and strategy.name == "multi_krum"
    out, _, _ = aggregate(strategy, g, uploads)
    target = mean_of(honest[2:])
    for key, value in target.items():
        assert torch.allclose(out[key], value, atol=1e-6), key


def test_anchored_mean_drops_the_updates_pointing_against_the_median_update() -> None:
    """Sign-flipped uploads point against the coordinate-wise median update: they are dropped
    (and counted, per module) and the honest ones averaged, clipped to the median norm."""
    g = global_state()
    honest = honest_uploads(g, 10, seed=7, noise=0.15)  # noise 1.5x the shared direction
    uploads = [attacked(g, u, "sign_flipped") for u in honest[:2]] + honest[2:]
    target = mean_of(honest[2:])
    out, _, values = aggregate(AnchoredMeanStrategy(), g, uploads)
    assert values["anchored_dropped_uploads"] == 4  # the two attackers, in both modules
    assert distance(out, target) < 0.05 * distance(target, g)
    _, _, clean = aggregate(AnchoredMeanStrategy(), g, honest)
    assert clean["anchored_dropped_uploads"] == 0


def test_anchored_mean_clips_a_boosted_update_to_the_median_norm() -> None:
    g = global_state()
    honest = honest_uploads(g, 5, seed=9)
    uploads = [attacked(g, honest[0], "scaled"), *honest[1:]]
    out, _, values = aggregate(make_strategy(StrategyConfig(name="anchored_mean")), g, uploads)
    assert values["anchored_dropped_uploads"] == 0  # it points the honest way: kept, clipped
    assert distance(out, mean_of(honest)) < 0.05 * distance(mean_of(honest), g)


def test_krum_returns_one_honest_upload_exactly() -> None:
    g = global_state()
    honest = honest_uploads(g, 10, seed=11)
    uploads = [attacked(g, u, "scaled") for u in honest[:2]] + honest[2:]
    out, _, _ = aggregate(KrumStrategy(num_byzantine=2), g, uploads)
    matches = [
        i for i, u in enumerate(uploads) if all(torch.equal(out[k], u[k]) for k in ("enc.weight",))
    ]
    assert len(matches) == 1 and matches[0] >= 2, "Krum must pick one of the honest uploads"


@pytest.mark.parametrize("n", [5, 6])
def test_median_and_trimmed_mean_match_reference(n: int) -> None:
    g = global_state()
    uploads = honest_uploads(g, n, seed=n, noise=1.0)
    median, _, _ = aggregate(MedianStrategy(), g, uploads)
    trimmed, _, _ = aggregate(TrimmedMeanStrategy(trim_ratio=0.25), g, uploads)
    for key in ("enc.weight", "head.weight"):
        stack = np.stack([u[key].numpy() for u in uploads]).astype(np.float64)
        np.testing.assert_allclose(median[key].numpy(), np.median(stack, axis=0), rtol=1e-6)
        np.testing.assert_allclose(
            trimmed[key].numpy(), stats.trim_mean(stack, 0.25, axis=0), rtol=1e-5, atol=1e-6
        )


def test_chunked_aggregation_equals_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    g = global_state()
    uploads = honest_uploads(g, 7, seed=2, noise=1.0)
    whole = [aggregate(make(), g, uploads)[0] for make in ROBUST.values()]
    monkeypatch.setattr(robust_aggregation, "CHUNK_ELEMENTS", 5)
    chunked = [aggregate(make(), g, uploads)[0] for make in ROBUST.values()]
    for a, b in zip(whole, chunked, strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_module_aware_over_the_clients_that_trained_it(name: str) -> None:
    g = global_state()
    uploads = honest_uploads(g, 9, seed=5, noise=0.5)
    # clients 0-2 trained only enc: their head copies are garbage the rule must never see
    weights = [{"enc": 1.0, "head": 0.0}] * 3 + [dict(ALL)] * 6
    for u in uploads[:3]:
        u["head.weight"] = u["head.weight"] * 1e6
    out, trained, _ = aggregate(ROBUST[name](), g, uploads, weights)
    alone, _, _ = aggregate(
        ROBUST[name](), g, uploads[3:], [{"enc": 0.0, "head": 1.0}] * 6
    )  # head over the six head-trainers only
    torch.testing.assert_close(out["head.weight"], alone["head.weight"])
    assert trained == frozenset({"enc", "head"})
    assert torch.equal(out["head.count"], g["head.count"])
    nobody, trained_none, _ = aggregate(ROBUST[name](), g, uploads, [{"enc": 1.0, "head": 0.0}] * 9)
    assert torch.equal(nobody["head.weight"], g["head.weight"]) and trained_none == {"enc"}


def test_scale_clips_toward_the_global_model_before_buffering() -> None:
    g = global_state()
    (upload,) = honest_uploads(g, 1, seed=9)
    out, _, _ = aggregate(MedianStrategy(), g, [upload], scale=0.25)
    expected = g["enc.weight"] + 0.25 * (upload["enc.weight"] - g["enc.weight"])
    torch.testing.assert_close(out["enc.weight"], expected)


def test_krum_with_too_few_uploads_falls_back_to_median() -> None:
    g = global_state()
    uploads = honest_uploads(g, 6, seed=4, noise=1.0)  # 6 <= 2 f + 2 for f = 2
    out, _, values = aggregate(KrumStrategy(num_byzantine=2), g, uploads)
    median, _, _ = aggregate(MedianStrategy(), g, uploads)
    assert values["krum_median_fallback_modules"] == 2.0  # enc and head
    for key in out:
        assert torch.equal(out[key], median[key])


def test_peak_bytes_and_check_fits_refuse_what_would_not_fit() -> None:
    model = 40 * 2**20
    strategy = MedianStrategy()
    peak = strategy.peak_bytes(model, 10)
    assert 11 * model <= peak <= 11 * model + robust_aggregation.CHUNK_BYTES
    strategy.check_fits(model, 10, budget_bytes=peak)
    with pytest.raises(MemoryBudgetError, match=r"10 clients x 41,943,040 model bytes"):
        strategy.check_fits(model, 10, budget_bytes=peak - 1)
    assert isinstance(MemoryBudgetError("x"), ValueError)
    assert buffered_peak_bytes(model, 20) > peak


def test_buffer_cap_refuses_the_upload_that_would_exceed_it() -> None:
    g = global_state()
    per_upload = sum(v.numel() * v.element_size() for v in g.values() if v.is_floating_point())
    agg = MedianStrategy(max_buffer_bytes=2 * per_upload).begin_round(g, module_of_prefix)
    uploads = honest_uploads(g, 3)
    agg.add(uploads[0], ALL, 10)
    agg.add(uploads[1], ALL, 10)
    with pytest.raises(MemoryBudgetError, match="over max_buffer_bytes"):
        agg.add(uploads[2], ALL, 10)
    assert agg.num_updates == 2


def test_malformed_upload_names_the_key() -> None:
    g = global_state()
    (upload,) = honest_uploads(g, 1)
    del upload["enc.bias"]
    agg = TrimmedMeanStrategy().begin_round(g, module_of_prefix)
    with pytest.raises(InvalidUpdateError, match="enc.bias"):
        agg.add(upload, ALL, 10)
    upload["enc.bias"] = torch.zeros(3)
    with pytest.raises(InvalidUpdateError, match=r"enc.bias.*\(3,\).*\(16,\)"):
        agg.add(upload, ALL, 10)


@pytest.mark.parametrize(
    "make",
    [
        lambda: TrimmedMeanStrategy(trim_ratio=0.5),
        lambda: TrimmedMeanStrategy(trim_ratio=-0.1),
        lambda: KrumStrategy(num_byzantine=-1),
        lambda: KrumStrategy(num_selected=0),
        lambda: MedianStrategy(max_buffer_bytes=0),
    ],
)
def test_bad_parameters_are_refused(make: Callable[[], RobustStrategy]) -> None:
    with pytest.raises(ValueError, match="must be"):
        make()


def test_stateless_and_names() -> None:
    assert [make().name for make in (MedianStrategy, TrimmedMeanStrategy, KrumStrategy)] == [
        "median",
        "trimmed_mean",
        "krum",
    ]
    strategy = KrumStrategy()
    assert strategy.state_dict() == {}
    with pytest.raises(ValueError, match="no state"):
        strategy.load_state_dict({"m/x": torch.zeros(1)})


def test_robust_rules_are_strategies() -> None:
    """Static (mypy) and runtime check that the robust rules fit the Strategy protocol."""
    strategies: list[Strategy] = [make() for make in ROBUST.values()]
    aggregator: RoundAggregator = strategies[0].begin_round(global_state(), module_of_prefix)
    assert aggregator.modules == frozenset({"enc", "head"}) and aggregator.num_updates == 0
    assert [s.configure_round(1).proximal_mu for s in strategies] == [0.0] * len(strategies)


def _round_with_ids(
    strategy: RobustStrategy, g: State, uploads: list[State], clients: list[str]
) -> tuple[State, dict[str, float]]:
    agg = strategy.begin_round(g, module_of_prefix)
    for upload, client in zip(uploads, clients, strict=True):
        agg.add(upload, ALL, num_samples=10, client=client)
    result = agg.result()
    return strategy.finish_round(g, result), result.values


def _rounds_against(strategy: RobustStrategy, late_flips_aligned: bool) -> list[dict[str, float]]:
    """Three rounds of 8 honest clients and 2 attackers: they flip the honest update in
    rounds 1-2; in round 3 they either flip again or send an honest-looking update (as a
    flipped attacker does once its cosine drifts above 0, see DropRecord)."""
    g = global_state()
    clients = [f"c{i}" for i in range(10)]
    values = []
    for rnd in range(3):
        honest = honest_uploads(g, 10, seed=rnd)
        bad = (
            honest[:2]
            if (rnd == 2 and late_flips_aligned)
            else [attacked(g, u, "sign_flipped") for u in honest[:2]]
        )
        _, v = _round_with_ids(strategy, g, bad + honest[2:], clients)
        values.append(v)
    return values


def test_anchored_mean_leaves_out_the_clients_it_kept_dropping() -> None:
    strategy = make_strategy(StrategyConfig(name="anchored_mean"))  # exclude_after 2
    assert isinstance(strategy, AnchoredMeanStrategy)
    rounds = _rounds_against(strategy, late_flips_aligned=True)
    # rounds 1-2: the attackers' uploads (2 modules each) are dropped; round 3: left out,
    # although their updates now point the honest way
    assert [r.get("anchored_dropped_uploads", 0.0) for r in rounds] == [4.0, 4.0, 0.0]
    assert [r.get("anchored_excluded_uploads", 0.0) for r in rounds] == [0.0, 0.0, 4.0]
    assert strategy.anchored.record.excluded() == {"c0", "c1"}
    # without the record (the default), round 3 lets them back in
    plain = _rounds_against(AnchoredMeanStrategy(exclude_after=0), late_flips_aligned=True)
    assert [r.get("anchored_excluded_uploads", 0.0) for r in plain] == [0.0, 0.0, 0.0]


def test_a_client_dropped_in_under_half_of_its_uploads_stays_in() -> None:
    record = robust_aggregation.DropRecord(exclude_after=2)
    for dropped in (True, False, True, False, False):
        record.note("noisy", dropped)
    record.note("anonymous-is-never-counted", True)
    record.note("", True)
    assert record.excluded() == frozenset()
    record.note("noisy", True)  # 3 of 6: half
    assert record.excluded() == {"noisy"}
    assert "" not in record.heard


def test_the_drop_record_is_checkpointed_and_restored() -> None:
    strategy = AnchoredMeanStrategy(exclude_after=2)
    _rounds_against(strategy, late_flips_aligned=False)
    saved = strategy.state_dict()
    assert saved["anchored_drops/c0"].tolist() == [2, 2]  # dropped twice, then left out
    assert saved["anchored_drops/c5"].tolist() == [3, 0]
    restored = AnchoredMeanStrategy(exclude_after=2)
    restored.load_state_dict(saved)
    assert restored.anchored.record.excluded() == {"c0", "c1"}
    assert {k: v.tolist() for k, v in restored.state_dict().items()} == {
        k: v.tolist() for k, v in saved.items()
    }


@pytest.mark.parametrize(
    "state",
    [
        {"m/x": torch.zeros(2, dtype=torch.int64)},
        {"anchored_drops/c0": torch.tensor([1, 2])},  # more drops than uploads
        {"anchored_drops/c0": torch.tensor([1.0, 0.0])},
        {"anchored_drops/": torch.tensor([1, 0])},
    ],
)
def test_a_bad_drop_record_is_refused(state: State) -> None:
    strategy = AnchoredMeanStrategy(exclude_after=2)
    with pytest.raises(ValueError, match="drop record"):
        strategy.load_state_dict(state)
    assert strategy.state_dict() == {}
