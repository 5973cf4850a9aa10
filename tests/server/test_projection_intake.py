"""The projection intake reads the run's epsilon budget when a release arrives, so the admin's
live change of ``privacy.epsilon_budget`` applies to the next release (not only after a
restart), and a refused release leaves the client's count where it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from crossfed.common.privacy.projection_dp import (
    ProjectionDPParams,
    ProjectionMandate,
    privatize_projections,
)
from crossfed.common.wire.tensor_codec import encode_tensors
from crossfed.server.checkpoints import CheckpointStore
from crossfed.server.errors import PrivacyBudgetExceededError
from crossfed.server.privacy_ledger import PrivacyLedger
from crossfed.server.projection_exchange import ProjectionSpec
from crossfed.server.projection_privacy import ProjectionPrivacy
from crossfed.server.round_attempt import ACTION_TRAIN
from crossfed.server.round_engine import RoundEngine
from crossfed.server.round_policy import RoundPolicy
from crossfed.server.state.memory import InMemoryStateStore

from tests.support.engine_fixtures import BOTH, FakeClock, module_of, small_state

PARAMS = ProjectionDPParams(clip_norm=1.0, noise_multiplier=2.0)


def _release(seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    return encode_tensors(
        {
            "text_sum": privatize_projections(torch.ones(2, 3), PARAMS, gen),
            "image_sum": privatize_projections(torch.ones(2, 2), PARAMS, gen),
            "text_count": torch.tensor([1.0, 1.0]),
            "image_count": torch.tensor([1.0, 0.0]),
        }
    )


def test_a_live_budget_change_applies_to_the_next_release(tmp_path: Path) -> None:
    mandate = ProjectionMandate(noise_multiplier=2.0, clip_norm=1.0, delta=1e-5)
    engine = RoundEngine(
        InMemoryStateStore(),
        CheckpointStore(tmp_path / "ckpt", keep_last=2),
        small_state(),
        module_of,
        RoundPolicy(total_rounds=3, min_clients=2, round_deadline_s=60.0),
        projection_spec=ProjectionSpec(num_classes=2, text_dim=3, image_dim=2),
        projection_privacy=ProjectionPrivacy(mandate, PrivacyLedger(None)),
        clock=FakeClock(),
        commit_inline=True,
    )
    engine.start()
    for cid in "ab":
        engine.register(cid, BOTH, 10)
    assert engine.heartbeat("a").action == ACTION_TRAIN
    first = engine.projection_exchange.exchange("a", 1, _release(1), mechanism=PARAMS)
    spent = first.epsilon_spent
    assert spent > 0 and first.epsilon_budget == 0.0  # no budget yet: counted, not capped

    engine.epsilon_budget = spent / 2  # budgets are per client: b's first release is past it
    with pytest.raises(PrivacyBudgetExceededError):
        engine.projection_exchange.exchange("b", 1, _release(2), mechanism=PARAMS)
    with pytest.raises(PrivacyBudgetExceededError):
        engine.projection_exchange.exchange("b", 1, _release(3), mechanism=PARAMS)

    engine.epsilon_budget = spent * 3
    reply = engine.projection_exchange.exchange("b", 1, _release(4), mechanism=PARAMS)
    assert reply.epsilon_budget == spent * 3
    assert reply.epsilon_spent == pytest.approx(spent)  # the refused tries were not counted
