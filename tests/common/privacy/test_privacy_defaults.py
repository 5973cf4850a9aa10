"""A default that means something: with the default projection noise, a client holding both
modalities (two Gaussian releases per round: its text and image rows) spends epsilon <= 10
at delta = 1e-5 over the default run, with the calibration round (one more release) too, and
the default budget is 10."""

from __future__ import annotations

from crossfed.common.config import ClientPrivacyConfig, RoundPolicy
from crossfed.common.privacy.privacy_accountant import PrivacyAccountant
from crossfed.common.privacy.projection_dp import ProjectionDPParams


def test_the_default_run_spends_at_most_epsilon_10() -> None:
    privacy, rounds = ClientPrivacyConfig(), RoundPolicy().rounds
    assert privacy.delta == 1e-5 and privacy.epsilon_budget == 10.0
    z = ProjectionDPParams(privacy.clip, privacy.noise_multiplier).accounting_noise_multiplier
    accountant = PrivacyAccountant()
    accountant.step(z, 1.0, 2 * rounds)  # projections of a paired client, every round
    accountant.step(privacy.noise_multiplier, 1.0)  # calibration statistics (if enabled)
    assert accountant.epsilon(privacy.delta) <= 10.0
