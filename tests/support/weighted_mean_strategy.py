"""A small module-aware weighted-mean Strategy (FedAvg, eq. 15) for strategy tests.

Independent of the server's streaming FedAvg so wrappers and robust rules can be tested against
a plain reference: a module's keys average over the uploads with weight > 0 on it, modules
nobody trained keep their global value, integer buffers are never averaged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from crossfed.server.strategies.base import ModuleOf, RoundInstructions, RoundResult


def is_float(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point()


class WeightedMeanAggregator:
    """RoundAggregator over plain weighted means (float64 sums, cast back at the end)."""

    def __init__(self, global_state: Mapping[str, torch.Tensor], module_of: ModuleOf) -> None:
        self._global = dict(global_state)
        self._module = {k: module_of(k) for k in self._global}
        self.modules = frozenset(m for k, m in self._module.items() if is_float(self._global[k]))
        self._sums: dict[str, torch.Tensor] = {}
        self._weights: dict[str, float] = dict.fromkeys(self.modules, 0.0)
        self.num_updates = 0
        self.total_samples = 0

    def contributed_keys(self, weights: Mapping[str, float]) -> list[str]:
        return [
            k
            for k, g in self._global.items()
            if is_float(g) and float(weights.get(self._module[k], 0.0)) > 0.0
        ]

    def add(
        self,
        update: Mapping[str, torch.Tensor],
        weights: Mapping[str, float],
        num_samples: int,
        scale: float = 1.0,
        client: str = "",
    ) -> None:
        for key in self.contributed_keys(weights):
            glob = self._global[key].to(torch.float64)
            value = glob + scale * (update[key].to(torch.float64) - glob)
            w = float(weights[self._module[key]])
            self._sums[key] = self._sums.get(key, torch.zeros_like(glob)) + w * value
        for module in self.modules:
            self._weights[module] += float(weights.get(module, 0.0))
        self.num_updates += 1
        self.total_samples += num_samples

    def result(self) -> RoundResult:
        out: dict[str, torch.Tensor] = {}
        for key, glob in self._global.items():
            total = self._weights.get(self._module[key], 0.0)
            out[key] = (self._sums[key] / total).to(glob.dtype) if key in self._sums else glob
        trained = frozenset(m for m, w in self._weights.items() if w > 0.0)
        return RoundResult(state=out, trained_modules=trained)


class WeightedMeanStrategy:
    """FedAvg as a Strategy: identity finish_round, no state, streaming memory."""

    name = "weighted-mean"

    def __init__(self, proximal_mu: float = 0.0) -> None:
        self.proximal_mu = proximal_mu

    def configure_round(self, round_no: int) -> RoundInstructions:
        return RoundInstructions(proximal_mu=self.proximal_mu)

    def begin_round(
        self, global_state: Mapping[str, torch.Tensor], module_of: ModuleOf
    ) -> WeightedMeanAggregator:
        return WeightedMeanAggregator(global_state, module_of)

    def finish_round(
        self, global_state: Mapping[str, torch.Tensor], aggregate: RoundResult
    ) -> dict[str, torch.Tensor]:
        return dict(aggregate.state)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"weighted-mean strategy has no state, got keys {sorted(state)}")

    def peak_bytes(self, model_bytes: int, clients_per_round: int) -> int:
        return model_bytes


def module_of_prefix(key: str) -> str:
    """Module = the key's first dotted component (``"enc.weight"`` -> ``"enc"``)."""
    return key.split(".", 1)[0]
