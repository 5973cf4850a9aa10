"""Exceptions for wire-format problems; each message names the chunk or tensor at fault."""

from __future__ import annotations


class WireError(ValueError):
    """Base class: a payload, chunk or tensor set received from (or meant for) a peer is invalid."""


class MissingChunkError(WireError):
    """The payload was requested before every chunk arrived."""


class DuplicateChunkError(WireError):
    """A chunk index arrived twice."""


class OutOfOrderChunkError(WireError):
    """A chunk arrived further ahead than the reorder window allows."""


class PayloadTooLargeError(WireError):
    """A payload's declared or actual size exceeds the receiver's limit."""


class DigestMismatchError(WireError):
    """The reassembled payload's SHA-256 differs from the digest its chunks declared."""


class MalformedPayloadError(WireError):
    """Bytes that do not form a valid safetensors payload or chunk (garbage, truncated, bombs)."""


class TensorValidationError(WireError):
    """Tensors that are well-formed but wrong for their purpose (key, dtype, shape, values)."""
