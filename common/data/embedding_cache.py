"""On-disk cache of frozen-encoder outputs (eq. 1): encode once, train many epochs.

Key = encoder identity (name + weights digest) + digest of the exact input content, so a
second run never re-encodes and a changed model or input never reuses stale features. Files
are safetensors written atomically (temp + rename); each carries a SHA-256 of its tensor
bytes, checked on load, so a corrupted file is detected and rebuilt rather than trusted.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from crossfed.common import atomic_files
from crossfed.common.data.data_errors import EmbeddingCacheError
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.data.encoder_interface import ImageEncoder, TextEncoder
from crossfed.common.data.raw_dataset import RawDataset
from safetensors import SafetensorError
from safetensors.torch import load_file, save

log = logging.getLogger(__name__)
_FORMAT = "crossfed.EmbeddingCache/1"
_CHUNK = 1024


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_content_digest(texts: Sequence[str]) -> str:
    """Digest of an ordered list of captions (length-prefixed, so boundaries are unambiguous)."""
    h = hashlib.sha256()
    for text in texts:
        raw = text.encode("utf-8")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


def image_content_digest(images: np.ndarray) -> str:
    """Digest of an image array's shape, dtype and bytes."""
    h = hashlib.sha256(f"{images.shape}|{images.dtype}".encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


@dataclass
class CacheStats:
    """What the cache did; tests and benchmarks read it."""

    hits: int = 0
    misses: int = 0
    rebuilt_corrupt: int = 0


class EmbeddingCache:
    """Directory of cached embedding matrices keyed by (encoder identity, content digest)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddingCacheError(f"cannot create cache directory {self.root}: {exc}") from exc
        self.stats = CacheStats()

    def path_for(self, identity: str, content: str) -> Path:
        return self.root / _sha256(identity.encode())[:24] / f"{content[:40]}.safetensors"

    def get(self, identity: str, content: str) -> torch.Tensor | None:
        """Cached tensor for the key (counted as a hit), or None (a corrupt file counts as
        rebuilt_corrupt; the caller computes and `put`s)."""
        path = self.path_for(identity, content)
        if not path.is_file():
            return None
        cached = self._read(path, identity, content)
        if cached is None:
            self.stats.rebuilt_corrupt += 1
            return None
        self.stats.hits += 1
        return cached

    def get_or_compute(
        self, identity: str, content: str, compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """Cached tensor for the key, or compute(), store and return it."""
        cached = self.get(identity, content)
        if cached is not None:
            return cached
        self.stats.misses += 1
        value = compute().float().contiguous()
        self._write(self.path_for(identity, content), identity, content, value)
        return value

    def _read(self, path: Path, identity: str, content: str) -> torch.Tensor | None:
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            log.warning("embedding cache file %s unreadable (%s); rebuilding", path, exc)
            return None
        value = tensors.get("embeddings")
        if (
            value is None
            or meta.get("format") != _FORMAT
            or meta.get("identity") != identity
            or meta.get("content") != content
        ):
            log.warning("embedding cache file %s has a foreign key; rebuilding", path)
            return None
        if _sha256(value.numpy().tobytes()) != meta.get("sha256"):
            log.warning("embedding cache file %s fails its digest; rebuilding", path)
            return None
        return value

    def _write(self, path: Path, identity: str, content: str, value: torch.Tensor) -> None:
        meta = {
            "format": _FORMAT,
            "identity": identity,
            "content": content,
            "sha256": _sha256(value.numpy().tobytes()),
        }
        try:  # a lost entry is recomputed: no fsync
            atomic_files.write_atomic(
                path, save({"embeddings": value}, metadata=meta), durable=False
            )
        except OSError as exc:
            raise EmbeddingCacheError(f"cannot write cache file {path}: {exc}") from exc


def _encode_chunked(
    encode: Callable[[Any], torch.Tensor], items: Any, dim: int, label: str, progress: bool
) -> torch.Tensor:
    from crossfed.common.data.progress_display import make_progress  # rich: not on GPU boxes

    out = torch.zeros(len(items), dim)
    with make_progress(progress) as bar:
        task = bar.add_task(label, total=len(items))
        for start in range(0, len(items), _CHUNK):
            chunk = items[start : start + _CHUNK]
            out[start : start + len(chunk)] = encode(chunk)
            bar.advance(task, len(chunk))
    return out


def encode_texts(
    encoder: TextEncoder,
    texts: Sequence[str],
    cache: EmbeddingCache | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """E_t over captions; duplicates are encoded once; cached when a cache is given."""

    def compute() -> torch.Tensor:
        unique, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
        feats = _encode_chunked(
            lambda c: encoder.encode(list(c)), list(unique), encoder.dim, "encoding text", progress
        )
        return feats[torch.from_numpy(inverse.reshape(-1).astype(np.int64))]

    if not texts:
        return torch.zeros(0, encoder.dim)
    if cache is None:
        return compute()
    return cache.get_or_compute(encoder.identity, text_content_digest(texts), compute)


def encode_images(
    encoder: ImageEncoder,
    images: np.ndarray,
    cache: EmbeddingCache | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """E_i over images; cached when a cache is given."""

    def compute() -> torch.Tensor:
        return _encode_chunked(encoder.encode, images, encoder.dim, "encoding images", progress)

    if len(images) == 0:
        return torch.zeros(0, encoder.dim)
    if cache is None:
        return compute()
    return cache.get_or_compute(encoder.identity, image_content_digest(images), compute)


def encode_dataset(
    raw: RawDataset,
    text_encoder: TextEncoder,
    image_encoder: ImageEncoder,
    cache: EmbeddingCache | None = None,
    progress: bool = False,
) -> EmbeddingSet:
    """Eq. 1 over a RawDataset: only present modalities are encoded; absent rows stay zero."""
    n = len(raw)
    text = torch.zeros(n, text_encoder.dim)
    image = torch.zeros(n, image_encoder.dim)
    t_idx = np.flatnonzero(raw.has_text)
    i_idx = np.flatnonzero(raw.has_image)
    if len(t_idx):
        text[torch.from_numpy(t_idx)] = encode_texts(
            text_encoder, [raw.texts[i] for i in t_idx.tolist()], cache, progress
        )
    if len(i_idx):
        image[torch.from_numpy(i_idx)] = encode_images(
            image_encoder, raw.images[i_idx], cache, progress
        )
    return EmbeddingSet(
        text=text,
        image=image,
        has_text=torch.from_numpy(raw.has_text.astype(bool)),
        has_image=torch.from_numpy(raw.has_image.astype(bool)),
        labels=torch.from_numpy(raw.labels.astype(np.int64)),
    )
