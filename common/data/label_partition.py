"""Non-IID label partitioning across clients by Dirichlet(alpha), deterministic given a seed."""

from __future__ import annotations

import numpy as np
from crossfed.common.data.data_errors import DataError


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_samples: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Split sample indices into `num_clients` shards; per class, shares ~ Dir(alpha).

    Small alpha -> each client sees few classes; large alpha -> near-IID. Re-draws (up to
    max_tries) until every client holds at least `min_samples`.
    """
    if num_clients <= 0:
        raise DataError(f"num_clients must be positive, got {num_clients}")
    if alpha <= 0:
        raise DataError(f"Dirichlet alpha must be positive, got {alpha}")
    labels = np.asarray(labels)
    if len(labels) < num_clients * min_samples:
        raise DataError(
            f"{len(labels)} samples cannot give {num_clients} clients {min_samples} each"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for client, part in enumerate(np.split(idx, cuts)):
                shards[client].append(part)
        out = [np.sort(np.concatenate(parts)) for parts in shards]
        if min(len(s) for s in out) >= min_samples:
            return out
    raise DataError(
        f"could not give every one of {num_clients} clients >= {min_samples} samples with "
        f"alpha={alpha} in {max_tries} draws; raise alpha or lower num_clients"
    )
