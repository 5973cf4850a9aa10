"""EmbeddingSet: shape validation, subset, masks, safetensors round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from crossfed.common.data.data_errors import EmbeddingSetError
from crossfed.common.data.embeddings import EmbeddingSet


def make_set(n: int = 6) -> EmbeddingSet:
    g = torch.Generator().manual_seed(0)
    return EmbeddingSet(
        text=torch.randn(n, 4, generator=g),
        image=torch.randn(n, 3, generator=g),
        has_text=torch.ones(n, dtype=torch.bool),
        has_image=torch.ones(n, dtype=torch.bool),
        labels=torch.arange(n) % 2,
    )


def test_round_trip(tmp_path: Path) -> None:
    s = make_set()
    s.save(tmp_path / "x" / "set.safetensors")
    back = EmbeddingSet.load(tmp_path / "x" / "set.safetensors")
    for name in ("text", "image", "has_text", "has_image", "labels"):
        assert torch.equal(getattr(s, name), getattr(back, name))
    assert not list((tmp_path / "x").glob("*.tmp"))


def test_subset_and_masks() -> None:
    s = make_set()
    sub = s.subset([4, 1])
    assert len(sub) == 2 and torch.equal(sub.text[0], s.text[4])
    hidden = s.with_masks(torch.tensor([True] * 3 + [False] * 3), s.has_image)
    assert hidden.counts() == {"paired": 3, "text_only": 0, "image_only": 3}
    assert hidden.text[3:].abs().sum() == 0
    with pytest.raises(EmbeddingSetError, match="cannot mark"):
        hidden.with_masks(s.has_text, s.has_image)


def test_validation_names_the_problem(tmp_path: Path) -> None:
    s = make_set()
    with pytest.raises(EmbeddingSetError, match="text has shape"):
        EmbeddingSet(s.text[:3], s.image, s.has_text, s.has_image, s.labels)
    with pytest.raises(EmbeddingSetError, match="neither text nor image"):
        EmbeddingSet(
            s.text,
            s.image,
            torch.zeros(6, dtype=torch.bool),
            torch.zeros(6, dtype=torch.bool),
            s.labels,
        )
    with pytest.raises(EmbeddingSetError, match="dtype"):
        EmbeddingSet(s.text.double(), s.image, s.has_text, s.has_image, s.labels)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(EmbeddingSetError, match="cannot read"):
        EmbeddingSet.load(bad)
    with pytest.raises(EmbeddingSetError, match="not found"):
        EmbeddingSet.load(tmp_path / "nope.safetensors")
