"""What a server strategy asks of every client's local training in one round (sent with the
round in HeartbeatResponse): FedProx's proximal mu and FedLC's logit-adjustment tau. One
dataclass for both sides, so the server's strategies and the client's trainer name each ask
the same way, and one check of what a client accepts."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_PROXIMAL_MU = 1000.0  # FedProx mu above this is no strategy's; clients ignore it
MAX_LOGIT_ADJUSTMENT = 10.0  # FedLC tau above this is no strategy's; clients ignore it

#: field -> the largest value a client accepts
LIMITS = {"proximal_mu": MAX_PROXIMAL_MU, "logit_adjustment": MAX_LOGIT_ADJUSTMENT}


@dataclass(frozen=True)
class RoundInstructions:
    """What a strategy asks of every client in one round (0 everywhere: plain training)."""

    proximal_mu: float = 0.0  # FedProx: mu/2 ||w - w_global||^2 added to eq. 14
    logit_adjustment: float = 0.0  # FedLC tau: classification losses on logits + tau log prior


def out_of_range(name: str, value: float) -> bool:
    """True when ``value`` is not a number a strategy would send for ``name``."""
    return not (math.isfinite(value) and 0.0 <= value <= LIMITS[name])


#: Plain local training: what a round asks when its strategy asks nothing.
PLAIN = RoundInstructions()
