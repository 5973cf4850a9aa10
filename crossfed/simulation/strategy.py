"""The one seam between the simulator and the server's aggregation: an `AggregationStrategy`
turns a round's client updates into the next global model and says what the round asks of
clients (FedProx's mu). `make_strategy` returns the server's own strategies (server/
strategies/, by the same names and parameters as the server config's ``strategy`` section),
so a simulated run aggregates with the code `crossfed server` runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from pydantic import ValidationError

from crossfed.common.config import StrategyConfig
from crossfed.server.aggregation import ModuleOf, module_weights_of
from crossfed.server.strategies.base import RoundAggregator, RoundInstructions, Strategy
from crossfed.server.strategies.registry import known_strategies
from crossfed.server.strategies.registry import make_strategy as make_server_strategy
from crossfed.simulation.simulation_errors import SimulationError


class AggregationStrategy(Protocol):
    """A round's aggregation: ``begin_round`` with the global state (then ``instructions``
    says what the round asks of its clients), ``add`` each update (weights from
    ``weights_of``), then ``result`` is the next global state."""

    instructions: RoundInstructions

    def begin_round(self, global_state: Mapping[str, torch.Tensor], round_no: int) -> None:
        """Start a round from ``global_state`` (forgets any previous round's sums)."""
        ...

    def weights_of(self, num_samples: int, module_samples: Mapping[str, int]) -> dict[str, float]:
        """Per-module weights of one client's update (what the server derives from an upload)."""
        ...

    def add(
        self,
        update: Mapping[str, torch.Tensor],
        weights: Mapping[str, float],
        num_samples: int,
        client: str = "",
    ) -> None:
        """Fold one client's update in (``client``: its id, for strategies that remember)."""
        ...

    def result(self) -> dict[str, torch.Tensor]:
        """The next global state (the round's sums are spent)."""
        ...


class ServerStrategy:
    """`AggregationStrategy` over a server `Strategy`: its aggregator folds the updates, its
    ``finish_round`` makes the next global model (a server optimizer steps there)."""

    def __init__(self, strategy: Strategy, module_of: ModuleOf) -> None:
        self.strategy = strategy
        self._module_of = module_of
        self._global: Mapping[str, torch.Tensor] = {}
        self._fold: RoundAggregator | None = None
        self.instructions = RoundInstructions()

    def begin_round(self, global_state: Mapping[str, torch.Tensor], round_no: int) -> None:
        self._global = global_state
        self.instructions = self.strategy.configure_round(round_no + 1)  # the server counts from 1
        self._fold = self.strategy.begin_round(global_state, self._module_of)

    def _current(self) -> RoundAggregator:
        if self._fold is None:
            raise RuntimeError("begin_round first")
        return self._fold

    def weights_of(self, num_samples: int, module_samples: Mapping[str, int]) -> dict[str, float]:
        return module_weights_of(num_samples, module_samples, self._current().modules)

    def add(
        self,
        update: Mapping[str, torch.Tensor],
        weights: Mapping[str, float],
        num_samples: int,
        client: str = "",
    ) -> None:
        self._current().add(update, weights, num_samples, client=client)

    def result(self) -> dict[str, torch.Tensor]:
        aggregate = self._current().result()
        self._fold = None
        return self.strategy.finish_round(self._global, aggregate)


def strategy_names() -> tuple[str, ...]:
    """The names an experiment's ``strategy.name`` accepts (the server's registry)."""
    return tuple(known_strategies())


def make_strategy(
    name: str, module_of: ModuleOf, params: Mapping[str, float] | None = None
) -> ServerStrategy:
    """The server strategy an experiment names (``strategy.name``) with its parameters; a
    bad name or parameter is a one-line SimulationError."""
    try:
        config = StrategyConfig.model_validate({"name": name, **(params or {})})
        return ServerStrategy(make_server_strategy(config), module_of)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise SimulationError(f"strategy {name!r}: {where}: {first['msg']}") from exc
    except ValueError as exc:
        raise SimulationError(f"strategy: {exc}") from exc
