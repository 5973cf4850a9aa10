"""How rounds are run: selection fraction, min_clients, deadlines, straggler cut-off, retries.
A plain dataclass so the round engine stays independent of the config file format."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from crossfed.server.errors import ConfigurationError


@dataclass(frozen=True)
class RoundPolicy:
    """Round-scheduling knobs (FLARE-style min_clients + wait_time_after_min_received)."""

    total_rounds: int = 10
    min_clients: int = 2
    fraction: float = 1.0
    round_deadline_s: float = 600.0
    # straggler cut-off: once min_clients have uploaded, close after this many more seconds
    # (None = wait for every selected client or the deadline)
    wait_after_min_s: float | None = None
    # straggler cut-off as a share: once this fraction of the selected clients (and at least
    # min_clients) uploaded, the round closes (1.0 = wait for all or the deadline)
    straggler_fraction: float = 1.0
    # how long to wait for min_clients to be online before an attempt fails
    start_timeout_s: float = 300.0
    # attempts per round (the first one included) before the run ends as failed
    max_round_attempts: int = 3
    client_timeout_s: float = 60.0
    heartbeat_interval_ms: int = 2000
    poll_after_ms: int = 1000
    local_epochs: int = 0
    selection_seed: int = 0
    auto_start: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.total_rounds < 1:
            problems.append(f"total_rounds must be >= 1 (got {self.total_rounds})")
        if self.min_clients < 1:
            problems.append(f"min_clients must be >= 1 (got {self.min_clients})")
        if not 0.0 < self.fraction <= 1.0:
            problems.append(f"fraction must be in (0, 1] (got {self.fraction})")
        if self.round_deadline_s <= 0:
            problems.append(f"round_deadline_s must be > 0 (got {self.round_deadline_s})")
        if self.wait_after_min_s is not None and self.wait_after_min_s < 0:
            problems.append(f"wait_after_min_s must be >= 0 (got {self.wait_after_min_s})")
        if not 0.0 < self.straggler_fraction <= 1.0:
            problems.append(f"straggler_fraction must be in (0, 1] (got {self.straggler_fraction})")
        if self.start_timeout_s <= 0:
            problems.append(f"start_timeout_s must be > 0 (got {self.start_timeout_s})")
        if self.max_round_attempts < 1:
            problems.append(f"max_round_attempts must be >= 1 (got {self.max_round_attempts})")
        if self.client_timeout_s <= 0:
            problems.append(f"client_timeout_s must be > 0 (got {self.client_timeout_s})")
        if problems:
            raise ConfigurationError("invalid round policy: " + "; ".join(problems))

    def sample_size(self, available: int) -> int:
        """How many of ``available`` clients to select: ceil(fraction * n), at least min_clients."""
        return min(available, max(self.min_clients, math.ceil(self.fraction * available)))

    def enough_to_close(self, received: int, selected: int) -> bool:
        """Straggler cut-off by share: received >= ceil(straggler_fraction * selected)."""
        need = max(self.min_clients, math.ceil(self.straggler_fraction * selected - 1e-9))
        return received >= min(need, selected) and received >= self.min_clients

    def select(self, candidates: list[str], round_no: int, attempt: int) -> list[str]:
        """Deterministic (seeded per round and attempt) random sample of client ids."""
        pool = sorted(candidates)
        rng = random.Random(f"{self.selection_seed}:{round_no}:{attempt}")
        return sorted(rng.sample(pool, self.sample_size(len(pool))))
