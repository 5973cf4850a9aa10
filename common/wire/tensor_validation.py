"""Checking received tensors against what the receiver expects (keys, dtypes, shapes, values).

A decoded payload is well-formed but still untrusted: a peer can send the wrong keys, a
mis-shaped update, NaN/Inf that would poison FedAvg (eq. 15), or huge values. The receiver
describes what it expects with ``TensorSpec``s (usually ``spec_of`` its own model state) and
calls ``validate_tensors`` before using anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from crossfed.common.wire.errors import TensorValidationError

__all__ = ["TensorSpec", "spec_of", "validate_tensors"]

_UNSIGNED_WIDE = frozenset(
    getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name)
)


@dataclass(frozen=True)
class TensorSpec:
    """The dtype and shape a tensor must have."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.dtype} {list(self.shape)}"


def spec_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The specs of a tensor set, e.g. of the local model's ``state_dict()``."""
    return {name: TensorSpec(t.dtype, tuple(t.shape)) for name, t in tensors.items()}


def _widened(tensor: torch.Tensor) -> torch.Tensor:
    """float8 and uint16/32/64 lack CPU reduction kernels; compare them as float64."""
    if tensor.element_size() == 1 and tensor.is_floating_point():
        return tensor.to(torch.float64)
    if tensor.dtype in _UNSIGNED_WIDE:
        return tensor.to(torch.float64)
    return tensor


_SUMMED = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def _surely_finite(tensor: torch.Tensor) -> bool:
    """True only if every value is finite: a NaN or infinite value makes the sum NaN or
    infinite, so a finite sum proves it in one pass without a temporary (``isfinite`` costs
    ~30x more). A non-finite sum may also be an overflow: the caller checks exactly then."""
    return tensor.dtype in _SUMMED and math.isfinite(float(tensor.sum()))


def _check_values(name: str, tensor: torch.Tensor, max_abs: float | None) -> None:
    if tensor.numel() == 0 or tensor.dtype == torch.bool:
        return
    values = _widened(tensor)
    if values.is_floating_point() and not _surely_finite(values):
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise TensorValidationError(
                f"tensor {name!r}: {bad} of {tensor.numel()} values are NaN or infinite"
            )
    if max_abs is not None:
        low, high = (float(v) for v in torch.aminmax(values))
        worst = max(abs(low), abs(high))
        if worst > max_abs:
            raise TensorValidationError(
                f"tensor {name!r}: largest magnitude {worst:g} exceeds the bound {max_abs:g}"
            )


def validate_tensors(
    received: Mapping[str, torch.Tensor],
    expected: Mapping[str, TensorSpec],
    *,
    require_all: bool = True,
    max_abs: float | None = None,
) -> None:
    """Raise ``TensorValidationError`` naming the first offending key, if any.

    Checks: no key outside ``expected``; every expected key present (unless ``require_all`` is
    False, e.g. a module-aware update that carries only the modules a client trained); exact
    dtype and shape; finite values for floating dtypes; ``|x| <= max_abs`` when a bound is given.
    """
    if max_abs is not None and not (max_abs >= 0 and math.isfinite(max_abs)):
        raise ValueError(f"max_abs must be a finite number >= 0, got {max_abs!r}")
    unknown = sorted(set(received) - set(expected))
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise TensorValidationError(
            f"unexpected tensor {shown}: not one of the {len(expected)} expected keys"
        )
    if require_all:
        missing = sorted(set(expected) - set(received))
        if missing:
            shown = ", ".join(repr(k) for k in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise TensorValidationError(
                f"missing tensor {shown} ({len(missing)} of {len(expected)} expected keys absent)"
            )
    for name, tensor in received.items():
        spec = expected[name]
        if not isinstance(tensor, torch.Tensor):
            raise TensorValidationError(
                f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}"
            )
        if tensor.dtype != spec.dtype:
            raise TensorValidationError(
                f"tensor {name!r}: dtype {tensor.dtype}, expected {spec.dtype}"
            )
        if tuple(tensor.shape) != tuple(spec.shape):
            raise TensorValidationError(
                f"tensor {name!r}: shape {list(tensor.shape)}, expected {list(spec.shape)}"
            )
        _check_values(name, tensor, max_abs)
