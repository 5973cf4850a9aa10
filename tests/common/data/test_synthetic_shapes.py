"""The built-in dataset: deterministic, balanced-ish, and its label needs both modalities."""

from __future__ import annotations

import time

import numpy as np
import pytest
from crossfed.common.data.data_errors import DataError
from crossfed.common.data.synthetic_shapes import (
    _COLOUR_WORDS,
    _SHAPE_WORDS,
    COLOURS,
    SHAPES,
    SyntheticShapesConfig,
    generate_synthetic_shapes,
)


def test_same_seed_same_bytes_other_seed_differs() -> None:
    a = generate_synthetic_shapes(SyntheticShapesConfig(num_samples=300, seed=3))
    b = generate_synthetic_shapes(SyntheticShapesConfig(num_samples=300, seed=3))
    c = generate_synthetic_shapes(SyntheticShapesConfig(num_samples=300, seed=4))
    assert np.array_equal(a.images, b.images) and a.texts == b.texts
    assert np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)


def test_shape_in_every_caption_colour_only_in_some() -> None:
    data = generate_synthetic_shapes(SyntheticShapesConfig(num_samples=2000, seed=1))
    assert data.images.shape == (2000, 32, 32, 3) and data.num_classes == 12
    assert len(np.unique(data.labels)) == 12
    named_colour = 0
    for text, label in zip(data.texts, data.labels):
        shape, colour = SHAPES[label // 3], COLOURS[label % 3]
        assert any(word in text for word in _SHAPE_WORDS[shape]), text
        named_colour += any(f" {w} " in f" {text} " for w in _COLOUR_WORDS[colour])
    # Exact colour words appear in roughly colour_mention_rate of captions, never all.
    assert 0.15 < named_colour / 2000 < 0.5
    assert len(set(data.texts)) > 1500  # wording varies


def test_image_colour_follows_the_colour_factor() -> None:
    data = generate_synthetic_shapes(SyntheticShapesConfig(num_samples=1500, seed=2))
    img = data.images.astype(np.float64)
    # The brightest-saturated pixels carry the colour: the dominant channel of the
    # per-image max pixel agrees with the colour factor far above chance (1/3).
    flat = img.reshape(len(img), -1, 3)
    sat = flat.max(axis=2) - flat.min(axis=2)
    top = flat[np.arange(len(img)), sat.argmax(axis=1)]
    agree = (top.argmax(axis=1) == np.array([0, 1, 2])[data.labels % 3]).mean()
    assert agree > 0.6


def test_rejects_bad_config() -> None:
    with pytest.raises(DataError, match="image_size"):
        generate_synthetic_shapes(SyntheticShapesConfig(num_samples=10, image_size=16))
    with pytest.raises(DataError, match="num_samples"):
        generate_synthetic_shapes(SyntheticShapesConfig(num_samples=0))


@pytest.mark.slow
def test_twenty_thousand_samples_under_a_minute() -> None:
    start = time.perf_counter()
    data = generate_synthetic_shapes(SyntheticShapesConfig(num_samples=20_000))
    assert len(data) == 20_000
    assert time.perf_counter() - start < 60
