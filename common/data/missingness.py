"""Missing-modality simulation, deterministic given a seed.

Two schemes, as in the literature the design card names:
- per sample (PmcmFL): a fraction `rate` of samples lose one modality, split evenly (or by
  `text_only_share`) into text-only and image-only subsets; the rest stay paired;
- per client (FedMultimodal): each client independently keeps each modality with probability
  1 - rate (Bernoulli); a client that would lose both keeps a randomly chosen one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from crossfed.common.data.data_errors import DataError


@dataclass(frozen=True)
class ModalityMasks:
    """Which samples keep their text / image."""

    has_text: np.ndarray  # bool [N]
    has_image: np.ndarray  # bool [N]


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise DataError(f"missing rate must be in [0, 1], got {rate}")


def per_sample_masks(
    num_samples: int, rate: float, seed: int, text_only_share: float = 0.5
) -> ModalityMasks:
    """PmcmFL-style: exactly round(rate*N) samples lose one modality (paired subset = rest)."""
    _check_rate(rate)
    if not 0.0 <= text_only_share <= 1.0:
        raise DataError(f"text_only_share must be in [0, 1], got {text_only_share}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_samples)
    n_missing = round(rate * num_samples)
    n_text_only = round(text_only_share * n_missing)
    has_text = np.ones(num_samples, dtype=bool)
    has_image = np.ones(num_samples, dtype=bool)
    has_image[order[:n_text_only]] = False
    has_text[order[n_text_only:n_missing]] = False
    return ModalityMasks(has_text=has_text, has_image=has_image)


def per_client_modalities(num_clients: int, rate: float, seed: int) -> list[tuple[bool, bool]]:
    """FedMultimodal-style: (has_text, has_image) per client, each dropped w.p. `rate`."""
    _check_rate(rate)
    rng = np.random.default_rng(seed)
    out: list[tuple[bool, bool]] = []
    for _ in range(num_clients):
        keep_text, keep_image = bool(rng.random() >= rate), bool(rng.random() >= rate)
        if not (keep_text or keep_image):
            keep_text = bool(rng.random() < 0.5)
            keep_image = not keep_text
        out.append((keep_text, keep_image))
    return out


def apply_client_modalities(
    client_indices: list[np.ndarray], modalities: list[tuple[bool, bool]], num_samples: int
) -> ModalityMasks:
    """Turn per-client (has_text, has_image) into per-sample masks over the whole dataset."""
    if len(client_indices) != len(modalities):
        raise DataError(f"{len(client_indices)} clients but {len(modalities)} modality entries")
    has_text = np.ones(num_samples, dtype=bool)
    has_image = np.ones(num_samples, dtype=bool)
    for idx, (keep_text, keep_image) in zip(client_indices, modalities):
        has_text[idx] = keep_text
        has_image[idx] = keep_image
    return ModalityMasks(has_text=has_text, has_image=has_image)
