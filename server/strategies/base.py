"""The strategy interface: what a round asks of clients and how uploads become the next model.

The round engine schedules (registry, selection, deadlines, lifecycle); a ``Strategy`` decides
the rest. One round is: ``configure_round`` (instructions sent with the round, e.g. FedProx's
mu), ``begin_round`` (an aggregator that folds validated uploads one at a time), then
``finish_round`` (a server-side optimizer step on the aggregate, eq. 15 when it is the identity).
Module-aware: every upload carries per-module weights; a module nobody trained keeps its value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from crossfed.common.round_instructions import RoundInstructions

ModuleOf = Callable[[str], str]

__all__ = ["ModuleOf", "RoundAggregator", "RoundInstructions", "RoundResult", "Strategy"]


@dataclass
class RoundResult:
    """An aggregator's output: the aggregated state and which modules some client trained."""

    state: dict[str, torch.Tensor]
    trained_modules: frozenset[str]
    values: dict[str, float] = field(default_factory=dict)  # figures for the commit event


class RoundAggregator(Protocol):
    """Folds one round attempt's validated uploads into an aggregate."""

    modules: frozenset[str]
    num_updates: int
    total_samples: int

    def contributed_keys(self, weights: Mapping[str, float]) -> list[str]:
        """The averaged tensors an upload with these module weights contributes to."""
        ...

    def add(
        self,
        update: Mapping[str, torch.Tensor],
        weights: Mapping[str, float],
        num_samples: int,
        scale: float = 1.0,
        client: str = "",
    ) -> None:
        """Fold one validated upload (``scale`` < 1: the update bound clipped it) from
        ``client`` (its id, for rules that remember clients across rounds; "" anonymous)."""
        ...

    def result(self) -> RoundResult:
        """The aggregate; the aggregator is finished afterwards."""
        ...


class Strategy(Protocol):
    """A federated optimisation strategy (FedAvg, FedAvgM, FedAdam, median, ...)."""

    name: str

    def configure_round(self, round_no: int) -> RoundInstructions:
        """Instructions sent to the clients of round ``round_no``."""
        ...

    def begin_round(
        self, global_state: Mapping[str, torch.Tensor], module_of: ModuleOf
    ) -> RoundAggregator:
        """A fresh aggregator for one round attempt on top of ``global_state``."""
        ...

    def finish_round(
        self, global_state: Mapping[str, torch.Tensor], aggregate: RoundResult
    ) -> dict[str, torch.Tensor]:
        """The next global model from the aggregate (server optimizers step here, only on
        ``aggregate.trained_modules``); must not modify ``global_state``."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Server-side optimizer state to checkpoint with the round (empty when stateless)."""
        ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned (after a crash)."""
        ...

    def peak_bytes(self, model_bytes: int, clients_per_round: int) -> int:
        """Server memory one round needs beyond the global model, to refuse what won't fit."""
        ...
