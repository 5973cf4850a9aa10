"""The one seam between the simulator and the server's aggregation: an `AggregationStrategy`
turns a round's client updates into the next global model. Today the only implementation
adapts the server's module-aware `StreamingFedAvg` (eq. 15, server/aggregation.py), the code
`crossfed server` runs; when the server grows pluggable strategies, `make_strategy` returns
theirs and nothing else here changes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from crossfed.server.aggregation import ModuleOf, StreamingFedAvg, module_weights_of
from crossfed.simulation.simulation_errors import SimulationError


class AggregationStrategy(Protocol):
    """A round's aggregation: ``begin_round`` with the global state, ``add`` each update
    (weights from ``weights_of``), then ``result`` is the next global state."""

    def begin_round(self, global_state: Mapping[str, torch.Tensor], round_no: int) -> None:
        """Start a round from ``global_state`` (forgets any previous round's sums)."""
        ...

    def weights_of(self, num_samples: int, module_samples: Mapping[str, int]) -> dict[str, float]:
        """Per-module weights of one client's update (what the server derives from an upload)."""
        ...

    def add(
        self, update: Mapping[str, torch.Tensor], weights: Mapping[str, float], num_samples: int
    ) -> None:
        """Fold one client's update in."""
        ...

    def result(self) -> dict[str, torch.Tensor]:
        """The next global state (the round's sums are spent)."""
        ...


class ServerFedAvg:
    """`AggregationStrategy` over the server's `StreamingFedAvg`: module-aware, weighted by
    the samples that trained each module, O(model) memory whatever the client count."""

    def __init__(self, module_of: ModuleOf) -> None:
        self._module_of = module_of
        self._fold: StreamingFedAvg | None = None

    def begin_round(self, global_state: Mapping[str, torch.Tensor], round_no: int) -> None:
        self._fold = StreamingFedAvg(global_state, self._module_of)

    def _current(self) -> StreamingFedAvg:
        if self._fold is None:
            raise RuntimeError("begin_round first")
        return self._fold

    def weights_of(self, num_samples: int, module_samples: Mapping[str, int]) -> dict[str, float]:
        return module_weights_of(num_samples, module_samples, self._current().modules)

    def add(
        self, update: Mapping[str, torch.Tensor], weights: Mapping[str, float], num_samples: int
    ) -> None:
        self._current().add(update, weights, num_samples)

    def result(self) -> dict[str, torch.Tensor]:
        state = self._current().result()
        self._fold = None
        return state


def strategy_names() -> tuple[str, ...]:
    """The names an experiment's ``strategy.name`` accepts."""
    return ("fedavg",)


def make_strategy(name: str, module_of: ModuleOf) -> AggregationStrategy:
    """The strategy an experiment names (``strategy.name``)."""
    if name == "fedavg":
        return ServerFedAvg(module_of)
    raise SimulationError(f"unknown strategy {name!r}; known: fedavg")
