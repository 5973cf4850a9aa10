"""Live config validation without a server: whitelist, pydantic validation of each value,
all-or-nothing, normalised applied values; the round policy mapping; loopback detection."""

from __future__ import annotations

import pytest
from crossfed.common.config import ServerConfig
from crossfed.server.admin_servicer import (
    LIVE_CONFIG_KEYS,
    LiveConfigError,
    _is_loopback_peer,
    policy_for,
    validate_live_config,
)
from crossfed.server.round_policy import RoundPolicy
from hypothesis import given
from hypothesis import strategies as st


def test_valid_values_are_validated_and_normalised() -> None:
    base = ServerConfig()
    new, applied = validate_live_config(
        base, {"rounds.min_clients": " 4 ", "rounds.fraction": "0.25", "rounds.rounds": "12"}
    )
    assert (new.rounds.min_clients, new.rounds.fraction, new.rounds.rounds) == (4, 0.25, 12)
    assert applied == {"rounds.min_clients": "4", "rounds.fraction": "0.25", "rounds.rounds": "12"}
    assert base.rounds.min_clients == 2  # the original is not modified
    cleared, applied = validate_live_config(
        ServerConfig.model_validate({"privacy": {"epsilon_budget": 3.0}}),
        {"privacy.epsilon_budget": "None"},
    )
    assert cleared.privacy.epsilon_budget is None and applied == {"privacy.epsilon_budget": "None"}


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"rounds.min_clients": "0"}, "rounds.min_clients"),
        ({"rounds.fraction": "-0.1"}, "rounds.fraction"),
        ({"rounds.round_deadline_s": "ten"}, "rounds.round_deadline_s"),
        ({"rounds.straggler_cutoff": "2"}, "rounds.straggler_cutoff"),
        ({"privacy.epsilon_budget": "0"}, "privacy.epsilon_budget"),
        ({"tls.insecure": "true"}, "cannot be changed"),
        ({"state_dir": "/tmp/x"}, "cannot be changed"),
        ({"rounds.rounds": "3", "rounds.fraction": "7"}, "rounds.fraction"),
        # past SQLite's 64-bit INTEGER (found by the long admin fuzz run: it was UNKNOWN)
        ({"rounds.rounds": str(2**63)}, "rounds.rounds"),
        ({"rounds.max_retries_on_failed_round": "10000000"}, "max_retries_on_failed_round"),
        ({}, "no KEY=VALUE"),
    ],
)
def test_bad_values_name_the_problem(values: dict[str, str], needle: str) -> None:
    with pytest.raises(LiveConfigError) as err:
        validate_live_config(ServerConfig(), values)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


@given(
    st.dictionaries(
        st.sampled_from(sorted(LIVE_CONFIG_KEYS)),
        st.one_of(
            st.integers(-5, 50).map(str),
            st.floats(-1, 2, allow_nan=False).map(repr),
            st.sampled_from(["", "x", "none", "1e9", "nan"]),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_result_is_always_a_valid_config(values: dict[str, str]) -> None:
    """Whatever the input: either a LiveConfigError or a config that re-validates and holds
    exactly the applied values."""
    base = ServerConfig()
    try:
        new, applied = validate_live_config(base, values)
    except LiveConfigError:
        return
    assert ServerConfig.model_validate(new.model_dump()) == new
    assert set(applied) == set(values)


def test_policy_mapping_keeps_cli_only_timings() -> None:
    current = RoundPolicy(total_rounds=5, start_timeout_s=12.0, client_timeout_s=7.0)
    cfg = ServerConfig.model_validate(
        {
            "rounds": {
                "rounds": 9,
                "min_clients": 3,
                "fraction": 0.5,
                "round_deadline_s": 40,
                "straggler_cutoff": 0.8,
                "max_retries_on_failed_round": 1,
            }
        }
    )
    policy = policy_for(cfg, current)
    assert (policy.total_rounds, policy.min_clients, policy.fraction) == (9, 3, 0.5)
    assert (policy.round_deadline_s, policy.straggler_fraction) == (40.0, 0.8)
    assert policy.max_round_attempts == 2
    assert (policy.start_timeout_s, policy.client_timeout_s) == (12.0, 7.0)


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        ("ipv4:127.0.0.1:5000", True),
        ("ipv4:127.8.0.2:1", True),
        ("ipv6:[::1]:5000", True),
        ("ipv6:[::ffff:127.0.0.1]:5000", True),
        ("unix:/tmp/sock", True),
        ("ipv4:10.0.0.3:5000", False),
        ("ipv6:[2001:db8::1]:5000", False),
        ("", False),
    ],
)
def test_loopback_peers(peer: str, loopback: bool) -> None:
    assert _is_loopback_peer(peer) is loopback
