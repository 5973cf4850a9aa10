"""A run's (epsilon, delta) privacy budget and the refusal to spend past it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crossfed.common.privacy.privacy_accountant import PrivacyAccountant


class PrivacyBudgetError(ValueError):
    """An invalid budget (epsilon <= 0, delta outside (0, 1))."""


class PrivacyBudgetExceeded(Exception):
    """Continuing would spend more privacy than the configured budget allows."""

    def __init__(self, spent_epsilon: float, budget: PrivacyBudget, detail: str = "") -> None:
        self.spent_epsilon = spent_epsilon
        self.budget = budget
        message = (
            f"privacy budget exhausted: epsilon {spent_epsilon:.4g} > budget "
            f"{budget.epsilon:.4g} at delta {budget.delta:.2g}"
        )
        super().__init__(f"{message}; {detail}" if detail else message)


@dataclass(frozen=True)
class PrivacyBudget:
    """Maximum epsilon the run may spend, measured at ``delta``."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise PrivacyBudgetError(f"budget epsilon must be positive, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise PrivacyBudgetError(f"budget delta must be in (0, 1), got {self.delta}")


def check_budget(accountant: PrivacyAccountant, budget: PrivacyBudget) -> float:
    """Return the epsilon spent so far; raise PrivacyBudgetExceeded if it is over budget."""
    spent = accountant.epsilon(budget.delta)
    if spent > budget.epsilon:
        raise PrivacyBudgetExceeded(spent, budget)
    return spent


def ensure_next_round_fits(
    accountant: PrivacyAccountant,
    budget: PrivacyBudget,
    noise_multiplier: float,
    sample_rate: float,
    steps: int = 1,
) -> float:
    """Refuse to start a round whose release would push epsilon over the budget.

    Returns the epsilon the run would have spent after the round.
    """
    after = accountant.epsilon_after(budget.delta, noise_multiplier, sample_rate, steps)
    if after > budget.epsilon:
        raise PrivacyBudgetExceeded(
            after,
            budget,
            f"the next round (noise multiplier {noise_multiplier:g}, sample rate "
            f"{sample_rate:g}) would exceed it, so the run stops here",
        )
    return after
