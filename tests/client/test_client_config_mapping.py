"""A client config's `train:` and `reconnect:` sections and what the trainer and the retry
loop run with are one set of defaults and one mapping (no twin that drifts)."""

from __future__ import annotations

import random
from pathlib import Path

from crossfed.client.backoff import Backoff, RetryPolicy
from crossfed.client.daemon import DaemonOptions, _retry_policy
from crossfed.client.local_trainer import TrainConfig
from crossfed.common.config import ClientConfig


def test_an_empty_train_section_gives_the_trainers_defaults() -> None:
    section = ClientConfig().train
    mapped = TrainConfig.from_section(section)
    assert mapped == TrainConfig()
    assert (mapped.epochs, mapped.batch_size, mapped.lr) == (
        section.epochs,
        section.batch_size,
        section.lr,
    )


def test_train_section_values_and_runtime_settings_reach_the_trainer() -> None:
    section = ClientConfig.model_validate(
        {"train": {"epochs": 3, "batch_size": 7, "lr": 0.05}}
    ).train
    mapped = TrainConfig.from_section(section, num_threads=2, seed=9)
    assert (mapped.epochs, mapped.batch_size, mapped.lr) == (3, 7, 0.05)
    assert (mapped.num_threads, mapped.seed) == (2, 9)


def test_reconnect_section_and_retry_policy_share_their_defaults() -> None:
    section = ClientConfig().reconnect
    policy = RetryPolicy()
    assert (policy.initial_delay_s, policy.max_delay_s, policy.jitter) == (
        section.initial_s,
        section.max_s,
        section.jitter,
    )


def test_the_daemon_maps_the_reconnect_section_onto_its_retry_policy(tmp_path: Path) -> None:
    config = ClientConfig.model_validate(
        {"reconnect": {"initial_s": 0.25, "max_s": 4.0, "jitter": 0.75}}
    )
    policy = _retry_policy(config, DaemonOptions(state_dir=tmp_path, give_up_after_s=12.0))
    assert (policy.initial_delay_s, policy.max_delay_s, policy.jitter) == (0.25, 4.0, 0.75)
    assert policy.give_up_after_s == 12.0
    # the jitter is applied: delays of one attempt spread over [1 - jitter, 1] x ceiling
    delays = {Backoff(policy, random.Random(seed)).next_delay() for seed in range(20)}
    assert min(delays) >= 0.25 * 0.25 and max(delays) <= 0.25 and len(delays) > 1
