"""Check a decoded client update against the global model before it touches the running
sum (exact key set, dtypes, shapes, finite values), via the wire library's validator, and
report failures as `InvalidUpdateError` (gRPC INVALID_ARGUMENT)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from crossfed.common.wire.errors import TensorValidationError
from crossfed.common.wire.tensor_validation import TensorSpec, spec_of, validate_tensors
from crossfed.server.errors import InvalidUpdateError

TensorSlot = TensorSpec
spec_of_state = spec_of


def validate_update(
    tensors: Mapping[str, torch.Tensor], spec: Mapping[str, TensorSpec], what: str = "update"
) -> None:
    """Raise `InvalidUpdateError` unless ``tensors`` matches ``spec`` exactly and is finite."""
    try:
        validate_tensors(tensors, spec, require_all=True)
    except TensorValidationError as exc:
        raise InvalidUpdateError(f"{what} rejected: {exc}") from exc
