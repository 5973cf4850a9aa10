"""Central DP (DP-FedAvg, server side) as a wrapper around any strategy.

Each upload's delta from the global model, over the tensors it contributes to, is clipped to
L2 <= C before the inner aggregator folds it; every trained module's aggregate then gets
Gaussian noise of std z * `weighted_mean_sensitivity` * `modules_factor` (one Gaussian
mechanism with noise multiplier z per round: module means are over different clients, so one
client moves several of them at once; the factor covers that, 1 for a single module). The
sensitivity is that of a weighted mean, so it holds for mean-like inner aggregators (FedAvg
and the server optimizers that step on it), not for median/trimmed mean/Krum.

Epsilon is the server's own count: every committed round adds one step at the rate clients
were actually sampled that round (selected / eligible online, set by the engine when it opens
the attempt, which ``min_clients`` can push well above ``fraction``). The rates are part of
the strategy's checkpointed state, so a restart or a failed commit neither forgets nor adds one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
from crossfed.server.aggregation import is_averaged
from crossfed.server.strategies.base import (
    ModuleOf,
    RoundAggregator,
    RoundInstructions,
    RoundResult,
    Strategy,
)


def weighted_mean_sensitivity(clip_norm: float, max_weight: float, total_weight: float) -> float:
    """L2 sensitivity of sum_i w_i d_i / sum_i w_i over deltas with ||d_i|| <= C: removing
    client j moves it by (w_j/W) ||d_j - mean_without_j|| <= 2 C w_j / W, and replacing d_j
    by another clipped delta by w_j ||d_j - d_j'|| / W <= 2 C w_j / W; so 2 C max_w / W.
    (C max_w / W holds only for a fixed denominator; tests/server/test_central_dp_strategy.py
    checks both claims by brute force.)"""
    if total_weight <= 0.0:
        return 0.0
    return 2.0 * clip_norm * max_weight / total_weight


def modules_factor(trained_modules: int) -> float:
    """(1 + sqrt(K)) / 2 for K trained modules: what makes K per-module noises of std
    z * `weighted_mean_sensitivity` one Gaussian mechanism of multiplier z. Each module's mean
    is over its own clients, so removing client j moves module m by at most
    (a_m + C)/(2C) of its sensitivity (a_m = ||d_j on m||, sum a_m^2 <= C^2, the other
    clients' mean on m anywhere in the C ball); the sum of squares over K modules peaks at
    ((1 + sqrt(K)) / 2)^2 (a_m = C/sqrt(K)). One module: 1, the single-mean bound."""
    return (1.0 + math.sqrt(max(trained_modules, 1))) / 2.0


SAMPLE_RATE_VALUE = "central_dp_sample_rate"
_RATES_KEY = "central_dp.sample_rates"  # in the strategy state: one rate per noised round


def _fresh_generator() -> torch.Generator:
    """An unpredictable noise seed (DP noise must not be reproducible)."""
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return generator


class CentralDPAggregator:
    """Clips every upload's delta to C, folds it into the inner aggregator, noises the result."""

    def __init__(
        self,
        inner: RoundAggregator,
        global_state: Mapping[str, torch.Tensor],
        module_of: ModuleOf,
        clip_norm: float,
        noise_multiplier: float,
        generator: torch.Generator,
    ) -> None:
        self.inner = inner
        self._global = global_state
        self._module_of_key = {k: module_of(k) for k in global_state}
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self._generator = generator
        self.modules: frozenset[str] = inner.modules
        self.num_updates = 0
        self.total_samples = 0
        self.clipped_updates = 0
        self._weight: dict[str, float] = {m: 0.0 for m in self.modules}
        self._max_weight: dict[str, float] = {m: 0.0 for m in self.modules}
        # the chance a client took part this round (selected / eligible): set at opening
        self.sample_rate = 1.0

    def contributed_keys(self, weights: Mapping[str, float]) -> list[str]:
        """The inner aggregator's keys for these weights."""
        return self.inner.contributed_keys(weights)

    def add(
        self,
        update: Mapping[str, torch.Tensor],
        weights: Mapping[str, float],
        num_samples: int,
        scale: float = 1.0,
        client: str = "",
    ) -> None:
        """Clip the (already ``scale``-d) delta to C, then fold it into the inner aggregator."""
        keys = self.contributed_keys(weights)
        total = 0.0
        for key in keys:
            diff = update[key].to(torch.float64) - self._global[key].to(torch.float64)
            total += float(diff.pow(2).sum())
        norm = math.sqrt(total) * scale
        if norm > self.clip_norm:
            self.clipped_updates += 1
            scale *= self.clip_norm / norm
        self.inner.add(update, weights, num_samples, scale, client)
        for module in self.modules:
            w = float(weights.get(module, 0.0))
            self._weight[module] += w
            self._max_weight[module] = max(self._max_weight[module], w)
        self.num_updates = self.inner.num_updates
        self.total_samples = self.inner.total_samples

    def noise_std(self, module: str) -> float:
        """Per-coordinate noise std on ``module``'s aggregate (0 untrained): z * sensitivity
        * `modules_factor` of the round's trained modules."""
        trained = sum(1 for w in self._weight.values() if w > 0.0)
        return (
            self.noise_multiplier
            * weighted_mean_sensitivity(
                self.clip_norm, self._max_weight.get(module, 0.0), self._weight.get(module, 0.0)
            )
            * modules_factor(trained)
        )

    def result(self) -> RoundResult:
        """The inner aggregate with Gaussian noise on every trained module's tensors."""
        aggregate = self.inner.result()
        state = dict(aggregate.state)
        for key, value in state.items():
            module = self._module_of_key.get(key, "")
            if module not in aggregate.trained_modules or not is_averaged(value):
                continue
            std = self.noise_std(module)
            if std <= 0.0:
                continue
            wide = (
                value.to(torch.float32) if value.dtype in (torch.float16, torch.bfloat16) else value
            )
            noise = torch.randn(wide.shape, generator=self._generator, dtype=wide.dtype)
            state[key] = (wide + noise * std).to(value.dtype)
        values = {
            **aggregate.values,
            "central_dp_clipped": float(self.clipped_updates),
            SAMPLE_RATE_VALUE: self.sample_rate,
        }
        return RoundResult(state=state, trained_modules=aggregate.trained_modules, values=values)


class CentralDPStrategy:
    """Any strategy with central DP: clipped uploads, noised aggregate (module docstring)."""

    def __init__(
        self,
        inner: Strategy,
        clip_norm: float,
        noise_multiplier: float,
        generator: torch.Generator | None = None,
    ) -> None:
        if not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError(f"central DP clip_norm must be > 0, got {clip_norm}")
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"central DP noise_multiplier must be >= 0, got {noise_multiplier}")
        self.inner = inner
        self.name = inner.name
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self._generator = generator or _fresh_generator()
        self._rates: list[float] = []  # the sampling rate of every committed noised round

    def configure_round(self, round_no: int) -> RoundInstructions:
        """The inner strategy's instructions."""
        return self.inner.configure_round(round_no)

    def begin_round(
        self, global_state: Mapping[str, torch.Tensor], module_of: ModuleOf
    ) -> CentralDPAggregator:
        """The inner aggregator behind clipping and noise."""
        return CentralDPAggregator(
            self.inner.begin_round(global_state, module_of),
            global_state,
            module_of,
            self.clip_norm,
            self.noise_multiplier,
            self._generator,
        )

    def finish_round(
        self, global_state: Mapping[str, torch.Tensor], aggregate: RoundResult
    ) -> dict[str, torch.Tensor]:
        """The inner strategy's step on the noised aggregate (post-processing: no extra cost);
        the round's sampling rate joins the history that epsilon is counted from."""
        rate = float(aggregate.values.get(SAMPLE_RATE_VALUE, 1.0))
        self._rates.append(min(max(rate, 0.0), 1.0) or 1.0)
        return self.inner.finish_round(global_state, aggregate)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The inner strategy's state and the sampling rates of the noised rounds."""
        state = self.inner.state_dict()
        if self._rates:
            state[_RATES_KEY] = torch.tensor(self._rates, dtype=torch.float64)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the inner strategy's state and the rate history."""
        inner = dict(state)
        rates = inner.pop(_RATES_KEY, None)
        if rates is not None and (rates.dim() != 1 or not bool(((rates > 0) & (rates <= 1)).all())):
            raise ValueError(f"{_RATES_KEY} must be rates in (0, 1], got {rates}")
        self.inner.load_state_dict(inner)
        self._rates = [] if rates is None else [float(r) for r in rates]

    def epsilon_values(self, delta: float) -> dict[str, float]:
        """Epsilon of the committed noised rounds (Gaussian mechanism, multiplier z, each at
        its own client sampling rate), for a commit event; none without noise."""
        if self.noise_multiplier <= 0 or not self._rates:
            return {}
        from crossfed.common.privacy.privacy_accountant import PrivacyAccountant

        accountant = PrivacyAccountant()
        for rate in self._rates:
            accountant.step(self.noise_multiplier, rate)
        return {"central_dp_epsilon": accountant.epsilon(delta)}

    def peak_bytes(self, model_bytes: int, clients_per_round: int) -> int:
        """The inner strategy's peak plus one tensor's noise at a time (bounded by a model)."""
        return self.inner.peak_bytes(model_bytes, clients_per_round) + model_bytes
