"""Exceptions for bad data input: each names the problem instead of surfacing a bare trace."""

from __future__ import annotations


class DataError(ValueError):
    """Base class for every data-side input problem."""


class ManifestError(DataError):
    """A manifest (CSV/JSONL) is malformed or has bad rows and the caller asked for strictness."""


class EmbeddingSetError(DataError):
    """An EmbeddingSet has inconsistent shapes/dtypes or its file is unreadable."""


class EmbeddingCacheError(DataError):
    """The embedding cache cannot be used (unwritable root, inconsistent entry)."""


class EncoderError(DataError):
    """An encoder cannot be built or run (missing local model dir, unsupported model)."""
