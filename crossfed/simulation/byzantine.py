"""Byzantine clients for robustness benchmarks and tests only (never the deployed client): k of
N virtual clients train honestly, then replace their update θ_i by a poisoned one before it
is sent. ``scale`` sends θ_g + f·(θ_i − θ_g) (f = 100: a boosted update); ``sign_flip`` sends
θ_g − (θ_i − θ_g) (the negated pseudo-gradient); ``withhold`` sends θ_g back unchanged (a free
rider: its data never reaches the weights; the reference for what losing k clients' data costs).
Integer buffers (counters) stay honest."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

AttackKind = Literal["none", "scale", "sign_flip", "withhold"]
ATTACK_KINDS: tuple[AttackKind, ...] = ("none", "scale", "sign_flip", "withhold")


@dataclass(frozen=True)
class Attack:
    """What an attacking client does to its update (``kind`` none: nothing)."""

    kind: AttackKind = "none"
    factor: float = 100.0  # the scale attack's boost

    def __post_init__(self) -> None:
        if self.kind not in ATTACK_KINDS:
            raise ValueError(f"attack kind must be one of {ATTACK_KINDS}, got {self.kind!r}")
        if not np.isfinite(self.factor):
            raise ValueError(f"attack factor must be finite, got {self.factor}")


NO_ATTACK = Attack()


def attacker_clients(num_clients: int, count: int, seed: int) -> frozenset[int]:
    """The ``count`` attacking clients of a federation (a seeded draw, fixed for the run)."""
    if not 0 <= count <= num_clients:
        raise ValueError(f"attackers must be in [0, {num_clients}], got {count}")
    rng = np.random.default_rng([seed, 0xB12])
    return frozenset(int(c) for c in rng.choice(num_clients, size=count, replace=False))


def poison_update(
    update: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray], attack: Attack
) -> dict[str, np.ndarray]:
    """The update an attacking client sends instead of ``update`` (fresh arrays, same dtypes)."""
    if attack.kind == "none":
        return dict(update)
    out: dict[str, np.ndarray] = {}
    for key, theta in update.items():
        if not np.issubdtype(theta.dtype, np.floating):
            out[key] = theta
            continue
        base = global_state[key]
        delta = theta - base
        factor = {"scale": attack.factor, "sign_flip": -1.0, "withhold": 0.0}[attack.kind]
        out[key] = (base + factor * delta).astype(theta.dtype, copy=False)
    return out
