"""FedAvg, the default strategy: module-aware streaming weighted averaging (eq. 15).

Wraps `StreamingFedAvg` (server/aggregation.py): one running sum per tensor, O(model) server
memory however many clients upload; no server optimizer (``finish_round`` is the identity)
and no state to checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from crossfed.server.aggregation import StreamingFedAvg
from crossfed.server.strategies.base import ModuleOf, RoundInstructions, RoundResult


class FedAvgAggregator:
    """`RoundAggregator` over one `StreamingFedAvg` running sum."""

    def __init__(self, global_state: Mapping[str, torch.Tensor], module_of: ModuleOf) -> None:
        self.fold = StreamingFedAvg(global_state, module_of)
        self.modules: frozenset[str] = self.fold.modules
        self.num_updates = 0
        self.total_samples = 0

    def contributed_keys(self, weights: Mapping[str, float]) -> list[str]:
        """The averaged tensors an upload with these module weights contributes to."""
        return self.fold.contributed_keys(weights)

    def add(
        self,
        update: Mapping[str, torch.Tensor],
        weights: Mapping[str, float],
        num_samples: int,
        scale: float = 1.0,
        client: str = "",
    ) -> None:
        """Fold one validated upload into the running sum (who sent it does not matter)."""
        self.fold.add(update, weights, num_samples, scale)
        self.num_updates = self.fold.num_updates
        self.total_samples = self.fold.total_samples

    def result(self) -> RoundResult:
        """The weighted means; modules nobody trained keep their global value."""
        trained = frozenset(m for m, w in self.fold.module_weight_totals.items() if w > 0.0)
        return RoundResult(state=self.fold.result(), trained_modules=trained)


class FedAvg:
    """Plain FedAvg (eq. 15): the aggregate is the next global model. With ``proximal_mu`` > 0
    the clients train FedProx's proximal objective, with ``logit_adjustment`` tau > 0 FedLC's
    label-prior-shifted cross-entropy (the server side is unchanged either way)."""

    name = "fedavg"

    def __init__(self, proximal_mu: float = 0.0, logit_adjustment: float = 0.0) -> None:
        if not (math.isfinite(proximal_mu) and proximal_mu >= 0.0):
            raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
        if not (math.isfinite(logit_adjustment) and logit_adjustment >= 0.0):
            raise ValueError(f"logit_adjustment must be >= 0, got {logit_adjustment}")
        self.proximal_mu = proximal_mu
        self.logit_adjustment = logit_adjustment

    def configure_round(self, round_no: int) -> RoundInstructions:
        """Plain local training, or FedProx's mu and/or FedLC's tau."""
        return RoundInstructions(
            proximal_mu=self.proximal_mu, logit_adjustment=self.logit_adjustment
        )

    def begin_round(
        self, global_state: Mapping[str, torch.Tensor], module_of: ModuleOf
    ) -> FedAvgAggregator:
        """A fresh running sum on top of ``global_state``."""
        return FedAvgAggregator(global_state, module_of)

    def finish_round(
        self, global_state: Mapping[str, torch.Tensor], aggregate: RoundResult
    ) -> dict[str, torch.Tensor]:
        """The identity: the weighted mean is the new global model."""
        return aggregate.state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Stateless."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Stateless: only an empty state is accepted."""
        if state:
            raise ValueError(f"fedavg keeps no state, got tensors {sorted(state)[:5]}")

    def peak_bytes(self, model_bytes: int, clients_per_round: int) -> int:
        """One model-sized accumulator, whatever the number of clients."""
        return model_bytes
