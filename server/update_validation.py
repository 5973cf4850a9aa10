"""Check a decoded client update against the global model before it touches the running
sum (key set, dtypes, shapes, finite values), via the wire library's validator, and report
failures as `InvalidUpdateError` (gRPC INVALID_ARGUMENT). An update may leave out the keys of
modules it gives weight 0 (module-aware FedAvg never reads them), e.g. a client without the
Stable Diffusion checkpoint leaves out the SD deltas."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import torch
from crossfed.common.wire.errors import TensorValidationError
from crossfed.common.wire.tensor_validation import TensorSpec, spec_of, validate_tensors
from crossfed.server.errors import InvalidUpdateError

TensorSlot = TensorSpec
spec_of_state = spec_of


def required_keys(
    spec: Mapping[str, TensorSpec],
    weights: Mapping[str, float],
    module_of: Callable[[str], str],
) -> frozenset[str]:
    """Keys an update must carry: the floating tensors of the modules it gives weight > 0
    (integer buffers are never averaged; weight-0 modules are never read)."""
    return frozenset(
        k
        for k, s in spec.items()
        if s.dtype.is_floating_point and weights.get(module_of(k), 0.0) > 0.0
    )


def validate_update(
    tensors: Mapping[str, torch.Tensor],
    spec: Mapping[str, TensorSpec],
    what: str = "update",
    required: Collection[str] | None = None,
) -> None:
    """Raise `InvalidUpdateError` unless ``tensors`` fits ``spec`` (no other key, right dtype
    and shape, finite) and holds every key of ``required`` (None: every key of ``spec``)."""
    try:
        validate_tensors(tensors, spec, require_all=required is None)
    except TensorValidationError as exc:
        raise InvalidUpdateError(f"{what} rejected: {exc}") from exc
    if required is not None:
        missing = sorted(set(required) - set(tensors))
        if missing:
            shown = ", ".join(repr(k) for k in missing[:5])
            raise InvalidUpdateError(
                f"{what} rejected: missing tensor {shown} of a module it reports as trained "
                f"({len(missing)} absent)"
            )
