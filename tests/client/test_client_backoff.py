"""RetryPolicy/Backoff: delays grow, stay bounded, are jittered, and reset after success."""

from __future__ import annotations

import itertools
import random

import pytest
from crossfed.client.backoff import Backoff, RetryPolicy


def test_delays_grow_exponentially_and_never_exceed_max() -> None:
    policy = RetryPolicy(initial_delay_s=0.1, max_delay_s=2.0, multiplier=2.0, jitter=0.0)
    backoff = Backoff(policy, random.Random(0))
    delays = [backoff.next_delay() for _ in range(12)]
    assert delays[:5] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6])
    assert max(delays) == pytest.approx(2.0)
    assert all(b >= a for a, b in itertools.pairwise(delays))


def test_jitter_spreads_delays_inside_bounds() -> None:
    policy = RetryPolicy(initial_delay_s=1.0, max_delay_s=1.0, jitter=0.5)
    backoff = Backoff(policy, random.Random(1))
    delays = [backoff.next_delay() for _ in range(200)]
    assert all(0.5 <= d <= 1.0 for d in delays)
    # Jittered: not all equal, and they cover most of the allowed band.
    assert max(delays) - min(delays) > 0.3


def test_two_clients_with_different_seeds_do_not_retry_in_lockstep() -> None:
    policy = RetryPolicy(initial_delay_s=1.0, max_delay_s=8.0, jitter=0.5)
    a = Backoff(policy, random.Random(1))
    b = Backoff(policy, random.Random(2))
    assert [a.next_delay() for _ in range(5)] != [b.next_delay() for _ in range(5)]


def test_reset_after_success_starts_over_from_initial_delay() -> None:
    policy = RetryPolicy(initial_delay_s=0.1, max_delay_s=10.0, jitter=0.0, give_up_after_s=5.0)
    backoff = Backoff(policy, random.Random(0))
    for _ in range(6):
        backoff.record_wait(backoff.next_delay())
    assert backoff.next_delay() > 1.0
    backoff.reset()
    assert backoff.next_delay() == pytest.approx(0.1)
    assert not backoff.exhausted


def test_gives_up_after_configured_time_failing() -> None:
    policy = RetryPolicy(initial_delay_s=1.0, max_delay_s=1.0, jitter=0.0, give_up_after_s=3.0)
    backoff = Backoff(policy, random.Random(0))
    backoff.record_wait(backoff.next_delay())
    backoff.record_wait(backoff.next_delay())
    assert not backoff.exhausted
    backoff.record_wait(backoff.next_delay())
    assert backoff.exhausted


def test_no_give_up_when_unbounded() -> None:
    backoff = Backoff(RetryPolicy(give_up_after_s=None), random.Random(0))
    backoff.record_wait(1e9)
    assert not backoff.exhausted


def test_huge_attempt_counts_do_not_overflow() -> None:
    policy = RetryPolicy(initial_delay_s=0.5, max_delay_s=30.0, multiplier=10.0)
    assert policy.ceiling(10_000) == 30.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_delay_s": 0.0},
        {"initial_delay_s": 2.0, "max_delay_s": 1.0},
        {"multiplier": 0.5},
        {"jitter": 1.5},
        {"give_up_after_s": 0.0},
    ],
)
def test_invalid_policies_are_refused_with_a_message(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        RetryPolicy(**kwargs)
