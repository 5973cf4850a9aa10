"""Shared helpers for server tests: a fake clock, a small synthetic model, an engine factory."""

from __future__ import annotations

from pathlib import Path

import torch
from crossfed.server.calibration_round import CalibrationStep
from crossfed.server.checkpoints import CheckpointStore
from crossfed.server.projection_exchange import ProjectionSpec
from crossfed.server.round_engine import RoundEngine
from crossfed.server.round_policy import RoundPolicy
from crossfed.server.state.base import StateStore
from crossfed.server.state.memory import InMemoryStateStore
from crossfed.server.strategies.base import Strategy

BOTH = 1
TEXT_ONLY = 2
IMAGE_ONLY = 3


class FakeClock:
    """Manually advanced unix clock."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic model: a 'fusion' and a 'mapper' module plus an integer counter buffer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "fusion.weight": torch.randn(4, 3, generator=g),
        "fusion.bias": torch.randn(4, generator=g),
        "mapper.weight": torch.randn(3, 3, generator=g),
        "fusion.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    }


def module_of(key: str) -> str:
    """Module = first dotted component."""
    return key.split(".", 1)[0]


def make_engine(
    tmp_path: Path,
    clock: FakeClock,
    store: StateStore | None = None,
    state: dict[str, torch.Tensor] | None = None,
    strategy: Strategy | None = None,
    calibration: CalibrationStep | None = None,
    **policy_kw: object,
) -> RoundEngine:
    """An engine over ``tmp_path/ckpt`` with a default 2-client policy (overridable); its
    commits run inline on the caller (deterministic under the fake clock)."""
    kw: dict[str, object] = {
        "total_rounds": 3,
        "min_clients": 2,
        "round_deadline_s": 60.0,
        "start_timeout_s": 30.0,
    }
    kw.update(policy_kw)
    return RoundEngine(
        store or InMemoryStateStore(),
        CheckpointStore(tmp_path / "ckpt", keep_last=2),
        state or small_state(),
        module_of,
        RoundPolicy(**kw),  # type: ignore[arg-type]
        projection_spec=ProjectionSpec(num_classes=2, text_dim=3, image_dim=2),
        strategy=strategy,
        calibration=calibration,
        clock=clock,
        commit_inline=True,
    )
