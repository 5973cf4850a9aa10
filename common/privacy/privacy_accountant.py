"""Epsilon over rounds with Opacus' RDP accountant, with plain-JSON state (no pickle) so
the server can persist and restore it."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import numpy as np
from crossfed.common.privacy.budget import PrivacyBudget
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

STATE_VERSION = 1


@functools.lru_cache(maxsize=256)
def _rdp_one_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one subsampled-Gaussian step at Opacus' default orders (cached: RDP is
    linear in the number of steps, and the per-step value is the expensive part)."""
    rdp = rdp_analysis.compute_rdp(
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    )
    return tuple(float(v) for v in np.atleast_1d(rdp))


class PrivacyAccountantError(ValueError):
    """Invalid accountant input or a corrupt persisted state."""


def _check_step(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise PrivacyAccountantError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise PrivacyAccountantError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PrivacyAccountantError(f"steps must be a positive integer, got {steps!r}")


class PrivacyAccountant:
    """Tracks (noise_multiplier, sample_rate, steps) releases and converts to epsilon
    exactly as Opacus' RDPAccountant does (its history format, its orders).

    One ``step`` per round in which the mechanism ran; ``sample_rate`` is the probability
    that the protected unit took part (e.g. clients_per_round / num_clients for
    client-level DP, 1.0 when every round sees it).
    """

    def __init__(self, history: list[tuple[float, float, int]] | None = None) -> None:
        self._accountant = RDPAccountant()
        for noise_multiplier, sample_rate, steps in history or []:
            self.step(noise_multiplier, sample_rate, steps)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(float(n), float(q), int(s)) for n, q, s in self._accountant.history]

    @property
    def total_steps(self) -> int:
        return sum(s for _, _, s in self._accountant.history)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` releases (merged with the last entry like Opacus does)."""
        _check_step(noise_multiplier, sample_rate, steps)
        history = self._accountant.history
        if history and history[-1][0] == noise_multiplier and history[-1][1] == sample_rate:
            history[-1] = (noise_multiplier, sample_rate, history[-1][2] + steps)
        else:
            history.append((noise_multiplier, sample_rate, steps))

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before any step, inf with zero noise)."""
        if not 0 < delta < 1:
            raise PrivacyAccountantError(f"delta must be in (0, 1), got {delta}")
        if not self._accountant.history:
            return 0.0
        if any(n == 0 for n, _, _ in self._accountant.history):
            return math.inf
        total = np.zeros(len(RDPAccountant.DEFAULT_ALPHAS))
        for noise_multiplier, sample_rate, steps in self._accountant.history:
            total += steps * np.asarray(_rdp_one_step(noise_multiplier, sample_rate))
        eps, _ = rdp_analysis.get_privacy_spent(
            orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=delta
        )
        return float(eps)

    def epsilon_after(
        self, delta: float, noise_multiplier: float, sample_rate: float, steps: int = 1
    ) -> float:
        """Epsilon the run would have spent after ``steps`` more releases (no side effect)."""
        trial = PrivacyAccountant(self.history)
        trial.step(noise_multiplier, sample_rate, steps)
        return trial.epsilon(delta)

    def would_exceed(
        self,
        budget: PrivacyBudget,
        noise_multiplier: float | None = None,
        sample_rate: float | None = None,
        steps: int = 1,
    ) -> bool:
        """Whether the spent epsilon (or, given a next release, the epsilon after it)
        is over ``budget``."""
        if noise_multiplier is None or sample_rate is None:
            return self.epsilon(budget.delta) > budget.epsilon
        return self.epsilon_after(budget.delta, noise_multiplier, sample_rate, steps) > (
            budget.epsilon
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "mechanism": "rdp",
            "history": [list(entry) for entry in self.history],
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> PrivacyAccountant:
        try:
            if state.get("version") != STATE_VERSION or state.get("mechanism") != "rdp":
                raise PrivacyAccountantError(
                    f"unsupported accountant state version={state.get('version')!r} "
                    f"mechanism={state.get('mechanism')!r}"
                )
            history = [(float(n), float(q), int(s)) for n, q, s in state["history"]]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, PrivacyAccountantError):
                raise
            raise PrivacyAccountantError(f"corrupt accountant state: {exc}") from None
        return cls(history)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> PrivacyAccountant:
        try:
            state = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PrivacyAccountantError(f"accountant state is not JSON: {exc}") from None
        if not isinstance(state, dict):
            raise PrivacyAccountantError("accountant state must be a JSON object")
        return cls.from_dict(state)
