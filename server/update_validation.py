"""Check a decoded client update against the global model before it touches the running
sum: exact key set, dtypes, shapes, finite values. Errors say what is wrong and where."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from crossfed.server.errors import InvalidUpdateError

_MAX_LISTED = 5


@dataclass(frozen=True)
class TensorSlot:
    """Expected dtype and shape of one key of the update."""

    dtype: torch.dtype
    shape: tuple[int, ...]


def spec_of_state(state: Mapping[str, torch.Tensor]) -> dict[str, TensorSlot]:
    """The update spec implied by the global model: same keys, dtypes and shapes."""
    return {k: TensorSlot(v.dtype, tuple(v.shape)) for k, v in state.items()}


def _listed(keys: list[str]) -> str:
    head = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    return head + (f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def validate_update(
    tensors: Mapping[str, torch.Tensor], spec: Mapping[str, TensorSlot], what: str = "update"
) -> None:
    """Raise `InvalidUpdateError` unless ``tensors`` matches ``spec`` exactly and is finite."""
    unknown = sorted(set(tensors) - set(spec))
    if unknown:
        raise InvalidUpdateError(f"{what} has unknown key(s) {_listed(unknown)}")
    missing = sorted(set(spec) - set(tensors))
    if missing:
        raise InvalidUpdateError(f"{what} is missing key(s) {_listed(missing)}")
    for key, slot in spec.items():
        value = tensors[key]
        if value.dtype != slot.dtype:
            raise InvalidUpdateError(
                f"{what} key {key!r} has dtype {value.dtype}, expected {slot.dtype}"
            )
        if tuple(value.shape) != slot.shape:
            raise InvalidUpdateError(
                f"{what} key {key!r} has shape {list(value.shape)}, expected {list(slot.shape)}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise InvalidUpdateError(
                f"{what} key {key!r} has {bad} non-finite value(s) (NaN or Inf)"
            )
