"""Byzantine virtual clients (benchmarks/tests only): the poisoned update is exactly the
scaled or sign-flipped pseudo-gradient of the honest one, only the drawn attackers poison,
and the experiment file refuses inconsistent attack settings."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet
from pydantic import ValidationError

from crossfed.simulation.byzantine import Attack, attacker_clients, poison_update
from crossfed.simulation.client_executor import InlineExecutor
from crossfed.simulation.experiment import ExperimentConfig, RoundsSection
from crossfed.simulation.federation_data import FederationSetup, build_federation
from crossfed.simulation.federation_run import RunPlan, initial_global_state, run_federation
from crossfed.simulation.strategy import make_strategy
from crossfed.simulation.virtual_client import (
    Arrays,
    ClientTask,
    ClientUpdate,
    shard_arrays,
    train_client,
)
from tests.support.simulation_data import clustered_embeddings, experiment

CONFIG = ModelConfig(text_dim=16, image_dim=8, num_classes=4, hidden_dim=16)


def test_poison_update_math_and_integer_buffers() -> None:
    g: Arrays = {"w": np.array([1.0, 2.0], dtype=np.float32), "n": np.array([3], dtype=np.int64)}
    u: Arrays = {"w": np.array([1.5, 1.0], dtype=np.float32), "n": np.array([9], dtype=np.int64)}
    scaled = poison_update(u, g, Attack("scale", 100.0))
    np.testing.assert_allclose(scaled["w"], [51.0, -98.0])
    flipped = poison_update(u, g, Attack("sign_flip"))
    np.testing.assert_allclose(flipped["w"], [0.5, 3.0])
    withheld = poison_update(u, g, Attack("withhold"))
    np.testing.assert_array_equal(withheld["w"], g["w"])
    assert withheld["w"] is not g["w"] and withheld["n"][0] == 9
    assert scaled["w"].dtype == np.float32 and scaled["n"][0] == 9 and flipped["n"][0] == 9
    assert poison_update(u, g, Attack())["w"] is u["w"]
    with pytest.raises(ValueError, match="attack kind"):
        Attack("boost")  # type: ignore[arg-type]


def test_attackers_are_a_seeded_draw() -> None:
    a = attacker_clients(10, 2, seed=0)
    assert len(a) == 2 and a <= set(range(10)) and a == attacker_clients(10, 2, seed=0)
    assert len({attacker_clients(10, 2, seed=s) for s in range(8)}) > 1
    assert attacker_clients(10, 0, seed=0) == frozenset()
    with pytest.raises(ValueError, match="attackers"):
        attacker_clients(3, 4, seed=0)


def _round_updates(attack: Attack, attackers: frozenset[int]) -> dict[int, Arrays]:
    """Every client's sent update in one round (clients inline, captured on their way out)."""
    fed = build_federation(
        clustered_embeddings(240), FederationSetup("per_sample", 0.5, 0.5, 3, 1, 20), 0.25
    )
    sent: dict[int, Arrays] = {}

    def capture(
        config_json: str,
        task: ClientTask,
        global_state: Arrays,
        shard: Arrays,
        memory: Mapping[str, np.ndarray] | None,
        prototypes: Arrays | None,
    ) -> tuple[ClientUpdate, Arrays]:
        update, mem = train_client(config_json, task, global_state, shard, memory, prototypes)
        sent[task.client] = {k: v.copy() for k, v in update.state.items()}
        return update, mem

    plan = RunPlan(
        method="ours",
        seed=1,
        model=CONFIG,
        rounds=RoundsSection(rounds=1),
        local_epochs=1,
        batch_size=32,
        lr=2e-3,
        modality_dropout=0.0,
        exchange_projections=True,
        calibration_noise=0.0,
        threads_per_client=1,
        attack=attack,
        attackers=attackers,
    )
    run_federation(
        plan,
        InlineExecutor(0, client_fn=capture),
        [shard_arrays(s) for s in fed.shards],
        fed.test,
        make_strategy("fedavg", CrossModalNet.module_of),
    )
    return sent


def test_only_the_attackers_send_poisoned_updates() -> None:
    honest = _round_updates(Attack(), frozenset())
    poisoned = _round_updates(Attack("scale", 100.0), frozenset({1}))
    flipped = _round_updates(Attack("sign_flip"), frozenset({0, 2}))
    g = {k: v.numpy() for k, v in initial_global_state(CONFIG, 1).items()}
    for key, theta in honest[1].items():
        if np.issubdtype(theta.dtype, np.floating):
            np.testing.assert_allclose(
                poisoned[1][key], g[key] + 100.0 * (theta - g[key]), rtol=1e-5, atol=1e-5
            )
            np.testing.assert_allclose(
                flipped[0][key], 2 * g[key] - honest[0][key], rtol=1e-5, atol=1e-6
            )
    moved = sum(
        float(np.abs(honest[1][k] - g[k]).sum())
        for k in g
        if np.issubdtype(g[k].dtype, np.floating)
    )
    assert moved > 0  # the honest client trained, so the attack changed something
    for c in (0, 2):
        for key in honest[c]:
            np.testing.assert_array_equal(poisoned[c][key], honest[c][key])
    for key in honest[1]:
        np.testing.assert_array_equal(flipped[1][key], honest[1][key])


def test_experiment_refuses_inconsistent_attacks(tmp_path: Path) -> None:
    base = experiment(tmp_path / "e.safetensors")
    cfg = ExperimentConfig.model_validate({**base, "attack": {"kind": "scale", "clients": 2}})
    assert cfg.attack.factor == 100.0 and cfg.attack.clients == 2
    for bad, match in (
        ({"kind": "scale", "clients": 0}, "needs clients"),
        ({"kind": "none", "clients": 1}, "needs clients"),
        ({"kind": "scale", "clients": 5}, "exceeds federation.clients"),
        ({"kind": "boost", "clients": 1}, "kind"),
    ):
        with pytest.raises(ValidationError, match=match):
            ExperimentConfig.model_validate({**base, "attack": bad})


def test_experiment_strategy_names_and_params_are_the_servers(tmp_path: Path) -> None:
    base = experiment(tmp_path / "e.safetensors")
    cfg = ExperimentConfig.model_validate(
        {**base, "strategy": {"name": "fedavgm", "params": {"momentum": 0.5}}}
    )
    assert cfg.strategy.params == {"momentum": 0.5}
    for bad, match in (
        ({"name": "no-such-rule"}, "unknown strategy"),
        ({"name": "fedavgm", "params": {"trim_ratio": 0.2}}, "does not take trim_ratio"),
        ({"name": "fedavg", "params": {"proximal_mu": -1.0}}, "proximal_mu"),
    ):
        with pytest.raises(ValidationError, match=match):
            ExperimentConfig.model_validate({**base, "strategy": bad})
