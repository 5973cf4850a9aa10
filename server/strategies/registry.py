"""Strategies by name: what the server config's ``strategy`` section and ``--strategy`` pick."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from crossfed.common.config import StrategyConfig
from crossfed.server.strategies.base import Strategy
from crossfed.server.strategies.fedavg import FedAvg


@dataclass(frozen=True)
class StrategyEntry:
    """How to build one strategy, and the ``strategy`` parameters it takes."""

    build: Callable[[Mapping[str, float]], Strategy]
    params: frozenset[str]


#: name -> entry; the other strategies (server optimizers, robust aggregators) join here
STRATEGIES: dict[str, StrategyEntry] = {
    "fedavg": StrategyEntry(
        lambda p: FedAvg(proximal_mu=float(p.get("proximal_mu", 0.0))),
        frozenset({"proximal_mu"}),
    ),
}


def known_strategies() -> list[str]:
    """The names ``make_strategy`` accepts, sorted."""
    return sorted(STRATEGIES)


def make_strategy(config: StrategyConfig) -> Strategy:
    """The strategy ``config.name`` names, built from its parameters; an unknown name or a
    parameter that strategy does not take is refused (ValueError naming what is allowed)."""
    entry = STRATEGIES.get(config.name)
    if entry is None:
        raise ValueError(
            f"unknown strategy {config.name!r}; known strategies: {', '.join(known_strategies())}"
        )
    params = config.params()
    unused = sorted(set(params) - entry.params)
    if unused:
        takes = ", ".join(sorted(entry.params)) or "no parameters"
        raise ValueError(
            f"strategy {config.name!r} does not take {', '.join(unused)} (it takes: {takes})"
        )
    return entry.build(params)
