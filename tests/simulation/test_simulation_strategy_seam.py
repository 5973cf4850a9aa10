"""The simulator aggregates with the server's strategies (one seam): the same names, the
same module-aware result as the server's fold, and the same refusals."""

from __future__ import annotations

import pytest
import torch
from crossfed.server.aggregation import StreamingFedAvg
from crossfed.server.strategies.fedavg import FedAvg

from crossfed.simulation.simulation_errors import SimulationError
from crossfed.simulation.strategy import ServerStrategy, make_strategy


def _module_of(key: str) -> str:
    return key.split(".", 1)[0]


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"a.w": torch.full((3,), value), "b.w": torch.full((2,), value)}


def test_fedavg_by_name_matches_the_server_fold() -> None:
    strategy = make_strategy("fedavg", _module_of, {"proximal_mu": 0.01})
    assert isinstance(strategy, ServerStrategy) and isinstance(strategy.strategy, FedAvg)
    start = _state(0.0)
    strategy.begin_round(start, 0)
    assert strategy.instructions.proximal_mu == pytest.approx(0.01)
    fold = StreamingFedAvg(start, _module_of)
    for value, module_samples, n in ((1.0, {}, 4), (5.0, {"a": 2}, 2)):
        weights = strategy.weights_of(n, module_samples)
        strategy.add(_state(value), weights, n)
        fold.add(_state(value), weights, n)
    got, want = strategy.result(), fold.result()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key])
    assert float(got["a.w"][0]) == pytest.approx((4 * 1.0 + 2 * 5.0) / 6)
    assert float(got["b.w"][0]) == pytest.approx(1.0)  # only the first client trained b


def test_unknown_strategy_or_parameter_is_a_simulation_error() -> None:
    with pytest.raises(SimulationError, match="unknown strategy 'fedsgd'"):
        make_strategy("fedsgd", _module_of)
    with pytest.raises(SimulationError, match="does not take momentum"):
        make_strategy("fedavg", _module_of, {"momentum": 0.9})
