"""ServerOptions: overrides replace config values only when set; defaults live in the config."""

from __future__ import annotations

from pathlib import Path

import pytest
from crossfed.common.config import ConfigError, ServerConfig
from crossfed.server.server_app import ServerOptions, round_policy_from_config

from tests.support.small_model import SMALL_MODEL


def _config(tmp_path: Path, **rounds: object) -> ServerConfig:
    return ServerConfig.model_validate(
        {"model": SMALL_MODEL, "state_dir": str(tmp_path), "seed": 7, "rounds": rounds}
    )


def test_unset_overrides_keep_the_config_values(tmp_path: Path) -> None:
    config = _config(tmp_path, start_timeout_s=42.0, heartbeat_ms=250)
    effective = ServerOptions(tick_interval_s=0.05).apply_to(config)
    assert effective is config
    policy = round_policy_from_config(effective)
    assert (policy.start_timeout_s, policy.heartbeat_interval_ms, policy.selection_seed) == (
        42.0,
        250,
        7,
    )


def test_set_overrides_replace_nested_and_top_level_values(tmp_path: Path) -> None:
    config = _config(tmp_path, start_timeout_s=42.0, client_timeout_s=9.0)
    effective = ServerOptions(client_timeout_s=2.0, allow_unencrypted_uploads=True).apply_to(config)
    assert effective.rounds.client_timeout_s == 2.0
    assert effective.rounds.start_timeout_s == 42.0  # untouched
    assert effective.allow_unencrypted_uploads and not config.allow_unencrypted_uploads


def test_an_override_is_validated_like_the_config_file(tmp_path: Path) -> None:
    with pytest.raises((ConfigError, ValueError)):
        ServerOptions(keep_checkpoints=0).apply_to(_config(tmp_path))
