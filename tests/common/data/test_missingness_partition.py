"""Missing-modality simulation and Dirichlet label partitioning."""

from __future__ import annotations

import numpy as np
import pytest
from crossfed.common.data.data_errors import DataError
from crossfed.common.data.label_partition import dirichlet_partition
from crossfed.common.data.missingness import (
    apply_client_modalities,
    per_client_modalities,
    per_sample_masks,
)


def test_per_sample_rate_and_split() -> None:
    m = per_sample_masks(1000, rate=0.5, seed=0)
    assert (m.has_text | m.has_image).all()
    assert int((m.has_text & m.has_image).sum()) == 500
    assert int((m.has_text & ~m.has_image).sum()) == 250
    assert int((~m.has_text & m.has_image).sum()) == 250
    again = per_sample_masks(1000, rate=0.5, seed=0)
    other = per_sample_masks(1000, rate=0.5, seed=1)
    assert np.array_equal(m.has_text, again.has_text)
    assert not np.array_equal(m.has_text, other.has_text)


def test_per_sample_text_only_share() -> None:
    m = per_sample_masks(100, rate=0.4, seed=0, text_only_share=1.0)
    assert int((~m.has_image).sum()) == 40 and m.has_text.all()


def test_per_client_never_drops_both() -> None:
    mods = per_client_modalities(200, rate=0.7, seed=5)
    assert all(t or i for t, i in mods)
    kinds = set(mods)
    assert {(True, False), (False, True)} <= kinds
    assert per_client_modalities(200, rate=0.7, seed=5) == mods
    assert per_client_modalities(10, rate=0.0, seed=5) == [(True, True)] * 10


def test_apply_client_modalities() -> None:
    parts = [np.array([0, 1]), np.array([2, 3])]
    m = apply_client_modalities(parts, [(True, False), (False, True)], 4)
    assert m.has_text.tolist() == [True, True, False, False]
    assert m.has_image.tolist() == [False, False, True, True]
    with pytest.raises(DataError, match="clients"):
        apply_client_modalities(parts, [(True, True)], 4)


def test_bad_rate_rejected() -> None:
    with pytest.raises(DataError, match="rate"):
        per_sample_masks(10, rate=1.5, seed=0)


def test_dirichlet_covers_every_sample_once_and_alpha_controls_skew() -> None:
    labels = np.repeat(np.arange(10), 200)
    parts = dirichlet_partition(labels, 5, alpha=0.1, seed=0)
    joined = np.sort(np.concatenate(parts))
    assert np.array_equal(joined, np.arange(len(labels)))

    def mean_classes(p: list[np.ndarray]) -> float:
        # classes holding >5% of a client's data
        out = []
        for idx in p:
            counts = np.bincount(labels[idx], minlength=10) / max(len(idx), 1)
            out.append(int((counts > 0.05).sum()))
        return float(np.mean(out))

    skewed = mean_classes(parts)
    iid = mean_classes(dirichlet_partition(labels, 5, alpha=100.0, seed=0))
    assert iid == 10 and skewed < 7
    assert [p.tolist() for p in dirichlet_partition(labels, 5, 0.1, seed=0)] == [
        p.tolist() for p in parts
    ]


def test_dirichlet_rejects_bad_input() -> None:
    with pytest.raises(DataError, match="alpha"):
        dirichlet_partition(np.zeros(10), 2, alpha=0, seed=0)
    with pytest.raises(DataError, match="cannot give"):
        dirichlet_partition(np.zeros(3), 5, alpha=1, seed=0)
