"""Strategies by name: what the server config's ``strategy`` section and ``--strategy`` pick."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from crossfed.common.config import StrategyConfig
from crossfed.server.strategies.base import Strategy
from crossfed.server.strategies.fedavg import FedAvg
from crossfed.server.strategies.robust_aggregation import (
    AnchoredMeanStrategy,
    KrumStrategy,
    MedianStrategy,
    RobustStrategy,
    TrimmedMeanStrategy,
)
from crossfed.server.strategies.server_optimizers import FedAdagrad, FedAdam, FedAvgM, FedYogi


@dataclass(frozen=True)
class StrategyEntry:
    """How to build one strategy, and the ``strategy`` parameters it takes."""

    build: Callable[[Mapping[str, float]], Strategy]
    params: frozenset[str]


def _fedavg(p: Mapping[str, float]) -> FedAvg:
    return FedAvg(
        proximal_mu=float(p.get("proximal_mu", 0.0)),
        logit_adjustment=float(p.get("logit_adjustment", 0.0)),
    )


#: What every FedAvg-based strategy passes on to its clients.
_CLIENT_PARAMS = frozenset({"proximal_mu", "logit_adjustment"})


def _adaptive(cls: type[FedAdagrad | FedAdam | FedYogi]) -> StrategyEntry:
    """A Reddi et al. server optimizer over FedAvg (the constructor's defaults where unset)."""
    keys = ("server_lr", "beta1", "beta2", "tau")
    return StrategyEntry(
        lambda p: cls(_fedavg(p), **{k: float(p[k]) for k in keys if k in p}),
        frozenset({*keys, *_CLIENT_PARAMS}),
    )


#: name -> entry
STRATEGIES: dict[str, StrategyEntry] = {
    "fedavg": StrategyEntry(_fedavg, _CLIENT_PARAMS),
    "fedavgm": StrategyEntry(
        lambda p: FedAvgM(
            _fedavg(p), **{k: float(p[k]) for k in ("server_lr", "momentum") if k in p}
        ),
        frozenset({"server_lr", "momentum", *_CLIENT_PARAMS}),
    ),
    "fedadagrad": _adaptive(FedAdagrad),
    "fedadam": _adaptive(FedAdam),
    "fedyogi": _adaptive(FedYogi),
    "median": StrategyEntry(lambda p: MedianStrategy(), frozenset()),
    "anchored_mean": StrategyEntry(
        lambda p: AnchoredMeanStrategy(
            **({"exclude_after": int(p["exclude_after"])} if "exclude_after" in p else {})
        ),
        frozenset({"exclude_after"}),
    ),
    "trimmed_mean": StrategyEntry(
        lambda p: TrimmedMeanStrategy(
            **({"trim_ratio": p["trim_ratio"]} if "trim_ratio" in p else {})
        ),
        frozenset({"trim_ratio"}),
    ),
    "krum": StrategyEntry(
        lambda p: KrumStrategy(num_byzantine=int(p.get("krum_f", 1))), frozenset({"krum_f"})
    ),
    "multi_krum": StrategyEntry(
        lambda p: KrumStrategy(num_byzantine=int(p.get("krum_f", 1)), num_selected=None),
        frozenset({"krum_f"}),
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
    strategy = entry.build(params)
    if isinstance(strategy, RobustStrategy):
        strategy.max_buffer_bytes = int(config.buffer_budget_mb * 2**20)
    return strategy
