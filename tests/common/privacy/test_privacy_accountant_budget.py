"""Accountant (Opacus RDP) and budget refusal."""

from __future__ import annotations

import math

import pytest
from crossfed.common.privacy.budget import (
    PrivacyBudget,
    PrivacyBudgetError,
    PrivacyBudgetExceeded,
    check_budget,
    ensure_next_round_fits,
)
from crossfed.common.privacy.privacy_accountant import PrivacyAccountant, PrivacyAccountantError
from opacus.accountants import RDPAccountant

DELTA = 1e-5


def test_epsilon_monotone_in_rounds_and_matches_opacus() -> None:
    ours, theirs = PrivacyAccountant(), RDPAccountant()
    assert ours.epsilon(DELTA) == 0.0
    previous = 0.0
    schedule = [(1.1, 0.2)] * 3 + [(0.9, 0.5)] * 2 + [(1.1, 0.2)] * 2
    for sigma, q in schedule:
        ours.step(sigma, q)
        theirs.step(noise_multiplier=sigma, sample_rate=q)
        eps = ours.epsilon(DELTA)
        assert eps > previous
        assert eps == pytest.approx(theirs.get_epsilon(delta=DELTA), rel=1e-12)
        previous = eps
    assert ours.history == [(1.1, 0.2, 3), (0.9, 0.5, 2), (1.1, 0.2, 2)]
    assert ours.total_steps == 7
    # more noise spends less
    noisy = PrivacyAccountant()
    noisy.step(3.0, 0.2, 10)
    quiet = PrivacyAccountant()
    quiet.step(1.0, 0.2, 10)
    assert noisy.epsilon(DELTA) < quiet.epsilon(DELTA)


def test_multi_step_equals_repeated_steps_and_json_round_trip() -> None:
    a, b = PrivacyAccountant(), PrivacyAccountant()
    a.step(1.0, 0.1, 7)
    for _ in range(7):
        b.step(1.0, 0.1)
    assert a.history == b.history and a.epsilon(DELTA) == b.epsilon(DELTA)
    a.step(2.0, 1.0)
    restored = PrivacyAccountant.from_json(a.to_json())
    assert restored.history == a.history and restored.epsilon(DELTA) == a.epsilon(DELTA)
    assert '"history"' in a.to_json()


def test_bad_input_and_corrupt_state() -> None:
    acc = PrivacyAccountant()
    with pytest.raises(PrivacyAccountantError, match="sample_rate"):
        acc.step(1.0, 0.0)
    with pytest.raises(PrivacyAccountantError, match="noise_multiplier"):
        acc.step(-1.0, 0.5)
    with pytest.raises(PrivacyAccountantError, match="steps"):
        acc.step(1.0, 0.5, 0)
    with pytest.raises(PrivacyAccountantError, match="delta"):
        acc.epsilon(0)
    with pytest.raises(PrivacyAccountantError, match="not JSON"):
        PrivacyAccountant.from_json("{")
    with pytest.raises(PrivacyAccountantError, match="unsupported"):
        PrivacyAccountant.from_json('{"version": 9, "mechanism": "rdp", "history": []}')
    with pytest.raises(PrivacyAccountantError, match="corrupt"):
        PrivacyAccountant.from_json('{"version": 1, "mechanism": "rdp", "history": [[1]]}')
    acc.step(0.0, 1.0)
    assert math.isinf(acc.epsilon(DELTA))


def test_budget_refuses_to_continue_past_epsilon() -> None:
    budget = PrivacyBudget(epsilon=3.0, delta=DELTA)
    acc = PrivacyAccountant()
    rounds = 0
    with pytest.raises(PrivacyBudgetExceeded, match="would exceed") as err:
        while True:
            ensure_next_round_fits(acc, budget, noise_multiplier=2.0, sample_rate=0.3)
            acc.step(2.0, 0.3)
            rounds += 1
            assert check_budget(acc, budget) <= budget.epsilon
    assert rounds >= 3 and err.value.spent_epsilon > budget.epsilon
    assert acc.epsilon(DELTA) <= budget.epsilon
    assert acc.would_exceed(budget, 2.0, 0.3) and not acc.would_exceed(budget)
    acc.step(2.0, 0.3)  # a round run anyway is detected after the fact
    assert acc.would_exceed(budget)
    with pytest.raises(PrivacyBudgetExceeded, match="privacy budget exhausted"):
        check_budget(acc, budget)
    with pytest.raises(PrivacyBudgetError):
        PrivacyBudget(epsilon=0, delta=DELTA)
    with pytest.raises(PrivacyBudgetError):
        PrivacyBudget(epsilon=1, delta=1)
