"""The simulator runs the server's strategies through one seam (crossfed/simulation/
strategy.py): a server optimizer that is the identity (FedAvgM, server_lr 1, momentum 0)
gives FedAvg's model bit for bit, a real one a different model, a robust rule runs, and
FedProx's mu set on the strategy reaches every client's local training."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import torch
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet

from crossfed.simulation.client_executor import InlineExecutor
from crossfed.simulation.experiment import RoundsSection
from crossfed.simulation.federation_data import FederatedData, FederationSetup, build_federation
from crossfed.simulation.federation_run import RunPlan, run_federation
from crossfed.simulation.simulation_errors import SimulationError
from crossfed.simulation.strategy import make_strategy
from crossfed.simulation.virtual_client import (
    Arrays,
    ClientTask,
    ClientUpdate,
    shard_arrays,
    train_client,
)
from tests.support.simulation_data import clustered_embeddings

CONFIG = ModelConfig(text_dim=16, image_dim=8, num_classes=4, hidden_dim=16)
PLAN = RunPlan(
    method="ours",
    seed=2,
    model=CONFIG,
    rounds=RoundsSection(rounds=2),
    local_epochs=1,
    batch_size=32,
    lr=2e-3,
    modality_dropout=0.0,
    exchange_projections=True,
    calibration_noise=0.0,
    threads_per_client=1,
)


@pytest.fixture(scope="module")
def federation() -> FederatedData:
    data = clustered_embeddings(240)
    return build_federation(data, FederationSetup("per_sample", 0.5, 0.5, 3, 2, 20), 0.25)


def _final(
    fed: FederatedData,
    name: str,
    params: Mapping[str, float] | None = None,
    seen: list[tuple[float, float]] | None = None,
) -> dict[str, torch.Tensor]:
    def capture(
        config_json: str,
        task: ClientTask,
        global_state: Arrays,
        shard: Arrays,
        memory: Arrays | None,
        prototypes: Arrays | None,
    ) -> tuple[ClientUpdate, Arrays]:
        if seen is not None:
            seen.append((task.train.proximal_mu, task.train.logit_adjustment))
        return train_client(config_json, task, global_state, shard, memory, prototypes)

    outcome = run_federation(
        PLAN,
        InlineExecutor(0, client_fn=capture),
        [shard_arrays(s) for s in fed.shards],
        fed.test,
        make_strategy(name, CrossModalNet.module_of, params),
    )
    return outcome.state


def test_identity_optimizer_is_fedavg_and_momentum_is_not(federation: FederatedData) -> None:
    fedavg = _final(federation, "fedavg")
    identity = _final(federation, "fedavgm", {"server_lr": 1.0, "momentum": 0.0})
    momentum = _final(federation, "fedavgm", {"momentum": 0.9})
    median = _final(federation, "median")
    floats = [k for k, v in fedavg.items() if v.is_floating_point()]
    for k in floats:
        np.testing.assert_allclose(identity[k].numpy(), fedavg[k].numpy(), rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(momentum[k], fedavg[k]) for k in floats)
    assert any(not torch.allclose(median[k], fedavg[k]) for k in floats)
    assert all(torch.isfinite(median[k]).all() for k in floats)


def test_fedprox_mu_and_fedlc_tau_reach_every_client(federation: FederatedData) -> None:
    seen: list[tuple[float, float]] = []
    _final(federation, "fedavg", {"proximal_mu": 0.05, "logit_adjustment": 0.3}, seen)
    assert seen == [(0.05, 0.3)] * 6  # 3 clients x 2 rounds
    plain: list[tuple[float, float]] = []
    _final(federation, "fedavg", None, plain)
    assert plain == [(0.0, 0.0)] * 6


def test_unknown_strategy_or_parameter_is_one_line() -> None:
    with pytest.raises(SimulationError, match="unknown strategy 'bogus'"):
        make_strategy("bogus", CrossModalNet.module_of)
    with pytest.raises(SimulationError, match="does not take krum_f"):
        make_strategy("median", CrossModalNet.module_of, {"krum_f": 2})
