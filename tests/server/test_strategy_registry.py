"""Strategies by name from the config's `strategy` section: unknown names and parameters the
strategy does not take are refused with a message naming what is allowed; the server wraps
the strategy in central DP when privacy.central_dp is on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from crossfed.common.config import ServerConfig, StrategyConfig
from crossfed.server.errors import ConfigurationError
from crossfed.server.server_app import check_strategy_fits, strategy_from_config
from crossfed.server.strategies.central_dp import CentralDPStrategy
from crossfed.server.strategies.fedavg import FedAvg
from crossfed.server.strategies.registry import known_strategies, make_strategy
from crossfed.server.strategies.robust_aggregation import RobustStrategy
from pydantic import ValidationError
from typer.testing import CliRunner

from crossfed.cli import app


def test_fedavg_by_name_with_its_mu() -> None:
    strategy = make_strategy(StrategyConfig(name=" FedAvg ", proximal_mu=0.1))
    assert isinstance(strategy, FedAvg) and strategy.name == "fedavg"
    assert strategy.configure_round(3).proximal_mu == pytest.approx(0.1)
    assert strategy.state_dict() == {}


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_fedavg_based_strategies_send_fedlc_tau(name: str) -> None:
    strategy = make_strategy(StrategyConfig(name=name, logit_adjustment=0.3))
    asks = strategy.configure_round(2)
    assert asks.logit_adjustment == pytest.approx(0.3) and asks.proximal_mu == 0.0


def test_robust_rules_refuse_fedlc_tau_and_a_bad_tau_is_refused() -> None:
    with pytest.raises(ValueError, match="does not take logit_adjustment"):
        make_strategy(StrategyConfig(name="median", logit_adjustment=0.3))
    with pytest.raises(ValidationError, match="logit_adjustment"):
        StrategyConfig(logit_adjustment=-1.0)
    with pytest.raises(ValidationError, match="logit_adjustment"):
        StrategyConfig(logit_adjustment=11.0)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'") as err:
        make_strategy(StrategyConfig(name="fedsgd"))
    assert all(name in str(err.value) for name in known_strategies())


def test_a_parameter_the_strategy_does_not_take_is_refused() -> None:
    with pytest.raises(ValueError, match="does not take server_lr"):
        make_strategy(StrategyConfig(name="fedavg", server_lr=0.5))


def test_config_section_validates_values_and_refuses_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="trim_ratio"):
        StrategyConfig(trim_ratio=0.5)
    with pytest.raises(ValidationError, match="learning_rate"):
        ServerConfig.model_validate({"strategy": {"name": "fedavg", "learning_rate": 1.0}})
    assert StrategyConfig(momentum=0.9, krum_f=2).params() == {"momentum": 0.9, "krum_f": 2.0}


def test_server_wraps_the_strategy_in_central_dp_and_names_bad_config() -> None:
    config = ServerConfig.model_validate(
        {"privacy": {"central_dp": True, "central_dp_clip": 0.5}, "strategy": {"name": "fedavg"}}
    )
    strategy = strategy_from_config(config)
    assert isinstance(strategy, CentralDPStrategy) and isinstance(strategy.inner, FedAvg)
    assert strategy.clip_norm == 0.5
    with pytest.raises(ConfigurationError, match="strategy: unknown strategy"):
        strategy_from_config(ServerConfig.model_validate({"strategy": {"name": "nope"}}))


def test_central_dp_is_refused_around_a_strategy_that_is_not_a_mean() -> None:
    config = ServerConfig.model_validate(
        {"privacy": {"central_dp": True}, "strategy": {"name": "median"}}
    )
    with pytest.raises(ConfigurationError, match="'median' is not a mean"):
        strategy_from_config(config)


def test_a_buffering_strategy_gets_the_memory_budget_and_is_refused_when_it_cannot_fit() -> None:
    config = ServerConfig.model_validate(
        {"strategy": {"name": "trimmed_mean", "buffer_budget_mb": 40}, "rounds": {"min_clients": 4}}
    )
    strategy = strategy_from_config(config)
    assert isinstance(strategy, RobustStrategy) and strategy.max_buffer_bytes == 40 * 2**20
    state = {"w": torch.zeros(2_000_000)}  # 8 MB: 4 buffered uploads + work > 40 MiB
    with pytest.raises(ConfigurationError, match=r"4 clients x 8,000,000 model bytes"):
        check_strategy_fits(strategy, state, config)
    check_strategy_fits(strategy, {"w": torch.zeros(1_000)}, config)  # fits: no error
    check_strategy_fits(make_strategy(StrategyConfig()), state, config)  # fedavg streams


def test_server_start_refuses_an_unknown_strategy_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["server", "start", "--insecure", "--strategy", "nope"]
        + ["--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0"],
    )
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown strategy 'nope'" in lines[0] and "fedavg" in lines[0]


def test_the_readme_strategy_example_is_a_valid_config() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Strategies", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the README's Strategies section has no yaml block"
    config = ServerConfig.model_validate(yaml.safe_load(match.group(1)))
    assert isinstance(make_strategy(config.strategy), FedAvg)
