"""Exponential backoff with jitter for reconnecting to the server (kept apart from the loop so
it can be tested and tuned on its own)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from crossfed.common.config import RECONNECT_INITIAL_S, RECONNECT_JITTER, RECONNECT_MAX_S


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait between retries of a failed step, and when to give up.

    Delay of attempt n (0-based) is ``min(max_delay_s, initial_delay_s * multiplier**n)``,
    scaled by a uniform jitter factor in ``[1 - jitter, 1]`` so that clients restarted by one
    server outage do not reconnect in lock-step. ``give_up_after_s`` bounds the total time
    spent failing in a row (``None`` = retry forever).
    """

    initial_delay_s: float = RECONNECT_INITIAL_S
    max_delay_s: float = RECONNECT_MAX_S
    multiplier: float = 2.0
    jitter: float = RECONNECT_JITTER
    give_up_after_s: float | None = 600.0

    def __post_init__(self) -> None:
        if self.initial_delay_s <= 0:
            raise ValueError(f"initial_delay_s must be > 0, got {self.initial_delay_s}")
        if self.max_delay_s < self.initial_delay_s:
            raise ValueError(
                f"max_delay_s ({self.max_delay_s}) must be >= initial_delay_s "
                f"({self.initial_delay_s})"
            )
        if self.multiplier < 1.0:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")
        if self.give_up_after_s is not None and self.give_up_after_s <= 0:
            raise ValueError(f"give_up_after_s must be > 0 or None, got {self.give_up_after_s}")

    def ceiling(self, attempt: int) -> float:
        """Un-jittered delay of 0-based ``attempt`` (the upper bound of its jittered delay)."""
        # Cap the exponent so a very long outage cannot overflow the float.
        exponent = min(attempt, 1000)
        try:
            raw = self.initial_delay_s * self.multiplier**exponent
        except OverflowError:
            raw = self.max_delay_s
        return min(self.max_delay_s, raw)


@dataclass
class Backoff:
    """Stateful use of a :class:`RetryPolicy`: count consecutive failures, hand out the next
    delay, and reset after a success."""

    policy: RetryPolicy = field(default_factory=RetryPolicy)
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0
    failing_for_s: float = 0.0

    def next_delay(self) -> float:
        """Delay before the next retry; advances the failure count."""
        ceiling = self.policy.ceiling(self.attempt)
        factor = 1.0 - self.policy.jitter * self.rng.random()
        self.attempt += 1
        return ceiling * factor

    def record_wait(self, seconds: float) -> None:
        """Account time spent failing (waits and failed calls) towards ``give_up_after_s``."""
        self.failing_for_s += max(0.0, seconds)

    @property
    def exhausted(self) -> bool:
        """True once the failures in a row have lasted longer than the policy allows."""
        limit = self.policy.give_up_after_s
        return limit is not None and self.failing_for_s >= limit

    def reset(self) -> None:
        """Forget past failures (call after any successful step)."""
        self.attempt = 0
        self.failing_for_s = 0.0
