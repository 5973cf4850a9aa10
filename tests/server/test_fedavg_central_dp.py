"""Central DP in streaming FedAvg: each update delta clipped to L2 <= C before folding, the
weighted average noised with std z*C*max_w/W per module, and epsilon reported per commit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from crossfed.server.aggregation import CentralDP, StreamingFedAvg

from tests.support.engine_fixtures import BOTH, FakeClock, make_engine, small_state


def _module_of(key: str) -> str:
    return key.split(".")[0]


GLOBAL = {"a.w": torch.zeros(4), "b.w": torch.zeros(2)}


def test_update_within_clip_is_folded_unchanged() -> None:
    fed = StreamingFedAvg(GLOBAL, _module_of, CentralDP(clip_norm=10.0, noise_multiplier=0.0))
    fed.add({"a.w": torch.ones(4), "b.w": torch.ones(2)}, {"a": 1.0, "b": 1.0}, 1)
    out = fed.result()
    assert torch.equal(out["a.w"], torch.ones(4)) and fed.clipped_updates == 0


def test_large_update_is_clipped_to_c_over_all_modules_together() -> None:
    fed = StreamingFedAvg(GLOBAL, _module_of, CentralDP(clip_norm=1.0, noise_multiplier=0.0))
    # delta norm = sqrt(4*9 + 2*9) = sqrt(54); after clipping the whole delta has norm 1
    fed.add({"a.w": torch.full((4,), 3.0), "b.w": torch.full((2,), 3.0)}, {"a": 1.0, "b": 1.0}, 1)
    out = fed.result()
    norm = math.sqrt(float(out["a.w"].pow(2).sum() + out["b.w"].pow(2).sum()))
    assert norm == pytest.approx(1.0, rel=1e-6)
    assert fed.clipped_updates == 1
    assert torch.allclose(out["a.w"], torch.full((4,), 3.0 / math.sqrt(54)))


def test_clipping_is_relative_to_the_global_model() -> None:
    glob = {"a.w": torch.full((4,), 5.0), "b.w": torch.zeros(2)}
    fed = StreamingFedAvg(glob, _module_of, CentralDP(clip_norm=2.0, noise_multiplier=0.0))
    fed.add({"a.w": torch.full((4,), 6.0), "b.w": torch.zeros(2)}, {"a": 1.0, "b": 1.0}, 1)
    assert torch.equal(fed.result()["a.w"], torch.full((4,), 6.0))  # ||delta|| = 2: not clipped


def test_noise_std_matches_weighted_sensitivity() -> None:
    """std = z * C * max_i w_i / W, measured empirically on a large tensor."""
    big = {"a.w": torch.zeros(200_000)}
    gen = torch.Generator().manual_seed(0)
    fed = StreamingFedAvg(big, _module_of, CentralDP(clip_norm=0.5, noise_multiplier=2.0), gen)
    for w in (1.0, 3.0):  # W = 4, max w = 3
        fed.add({"a.w": torch.zeros(200_000)}, {"a": w}, int(w))
    expected = 2.0 * 0.5 * 3.0 / 4.0
    assert fed.noise_std("a") == pytest.approx(expected)
    measured = float(fed.result()["a.w"].std())
    assert measured == pytest.approx(expected, rel=0.02)


def test_module_nobody_trained_gets_no_noise() -> None:
    fed = StreamingFedAvg(GLOBAL, _module_of, CentralDP(clip_norm=1.0, noise_multiplier=5.0))
    fed.add({"a.w": torch.zeros(4), "b.w": torch.ones(2)}, {"a": 1.0, "b": 0.0}, 1)
    assert torch.equal(fed.result()["b.w"], GLOBAL["b.w"])


@pytest.mark.parametrize("clip,z", [(0.0, 1.0), (-1.0, 1.0), (1.0, -0.5), (math.inf, 1.0)])
def test_bad_parameters_are_refused(clip: float, z: float) -> None:
    with pytest.raises(ValueError, match="central DP"):
        CentralDP(clip_norm=clip, noise_multiplier=z)


def test_engine_reports_central_dp_epsilon_growing_with_rounds(tmp_path: Path) -> None:
    """With central DP on, every commit carries the clipped count and an epsilon that grows."""
    engine = make_engine(tmp_path, FakeClock(), total_rounds=2)
    engine.central_dp = CentralDP(clip_norm=0.1, noise_multiplier=1.0)
    for cid in "ab":
        engine.register(cid, BOTH, 10)
    for round_no in (1, 2):
        engine.heartbeat("a")
        for cid in "ab":
            ticket = engine.begin_upload(cid, round_no, f"{cid}-{round_no}", 10, {})
            engine.complete_upload(ticket, small_state(round_no + 10))  # type: ignore[arg-type]
    commits = [e for e in engine.store.events_after(0) if e.kind == "round_committed"]
    eps = [e.values["central_dp_epsilon"] for e in commits]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
    assert all(e.values["central_dp_clipped"] == 2.0 for e in commits)  # updates far beyond 0.1
