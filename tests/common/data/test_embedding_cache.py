"""Embedding cache: second run never re-encodes, corruption is detected and rebuilt."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from crossfed.common.data.embedding_cache import EmbeddingCache, encode_dataset, encode_texts
from crossfed.common.data.encoder_interface import TextEncoder
from crossfed.common.data.raw_dataset import RawDataset
from crossfed.common.model.encoders import SmallCNNImageEncoder


class CountingTextEncoder(TextEncoder):
    """Deterministic fake E_t that counts how many captions it really encoded."""

    def __init__(self, identity: str = "fake:v1") -> None:
        self.dim, self.identity, self.calls = 4, identity, 0

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        self.calls += len(texts)
        return torch.tensor([[len(t), t.count("a"), ord(t[0]) if t else 0, 1.0] for t in texts])


def _raw() -> RawDataset:
    imgs = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    return RawDataset(
        images=imgs,
        texts=["aa", "b", "", "aa"],
        labels=np.array([0, 1, 0, 1]),
        has_text=np.array([True, True, False, True]),
        has_image=np.array([True, False, True, True]),
    )


def test_second_run_hits_cache(tmp_path: Path) -> None:
    cache, enc, cnn = EmbeddingCache(tmp_path), CountingTextEncoder(), SmallCNNImageEncoder()
    first = encode_dataset(_raw(), enc, cnn, cache)
    assert enc.calls == 2  # "aa" deduplicated, absent text not encoded
    assert first.has_text.tolist() == [True, True, False, True]
    assert first.text[2].abs().sum() == 0 and first.image[1].abs().sum() == 0
    assert torch.equal(first.text[0], first.text[3])
    second = encode_dataset(_raw(), enc, cnn, EmbeddingCache(tmp_path))
    assert enc.calls == 2 and torch.equal(first.text, second.text)
    assert torch.equal(first.image, second.image)


def test_key_includes_identity_and_content(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    a, b = CountingTextEncoder("fake:v1"), CountingTextEncoder("fake:v2")
    encode_texts(a, ["x", "y"], cache)
    encode_texts(b, ["x", "y"], cache)
    encode_texts(a, ["x", "z"], cache)
    assert (a.calls, b.calls) == (4, 2) and cache.stats.misses == 3


def test_corrupted_file_is_rebuilt_not_trusted(tmp_path: Path) -> None:
    cache, enc = EmbeddingCache(tmp_path), CountingTextEncoder()
    good = encode_texts(enc, ["abc", "de"], cache)
    (path,) = list(tmp_path.rglob("*.safetensors"))
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0xFF  # flip bits inside the tensor payload; file still parses
    path.write_bytes(bytes(blob))
    again = encode_texts(enc, ["abc", "de"], EmbeddingCache(tmp_path))
    assert enc.calls == 4 and torch.equal(good, again)
    path.write_bytes(b"truncated")
    fresh = EmbeddingCache(tmp_path)
    assert torch.equal(encode_texts(enc, ["abc", "de"], fresh), good)
    assert fresh.stats.rebuilt_corrupt == 1 and enc.calls == 6
    assert not list(tmp_path.rglob("*.tmp"))
