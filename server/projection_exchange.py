"""Projection exchange (eq. 16): per-class sums/counts of f_t and f_i uploaded by clients are
added into global prototypes that every client receives. A `ProjectionNoiseHook` lets the
privacy code add server-side noise / accounting before prototypes are published."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from crossfed.common.wire.errors import WireError
from crossfed.common.wire.tensor_codec import decode_tensors, encode_tensors
from crossfed.server.errors import InvalidUpdateError

PROJECTION_KEYS = ("text_sum", "image_sum", "text_count", "image_count")
#: Where the engine publishes the global prototypes of a round, beside its checkpoints.
PROTOTYPES_FILE_NAME = "prototypes-{:06d}.safetensors"


@dataclass(frozen=True)
class ProjectionSpec:
    """Shapes of a projection payload: C classes, d_t text dims, d_i image dims."""

    num_classes: int
    text_dim: int
    image_dim: int

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shape per key."""
        c = self.num_classes
        return {
            "text_sum": (c, self.text_dim),
            "image_sum": (c, self.image_dim),
            "text_count": (c,),
            "image_count": (c,),
        }


class ProjectionNoiseHook(Protocol):
    """Server-side DP step applied to the aggregated sums before they are published."""

    def __call__(self, sums: dict[str, torch.Tensor], round_no: int) -> dict[str, torch.Tensor]:
        """Return the (possibly noised) sums."""
        ...


def decode_projections(payload: bytes, spec: ProjectionSpec) -> dict[str, torch.Tensor]:
    """Decode and validate one client's projection payload (keys, shapes, finite, counts >= 0)."""
    try:
        tensors = decode_tensors(payload)
    except WireError as exc:
        raise InvalidUpdateError(f"projection payload is not valid safetensors: {exc}") from exc
    expected = spec.shapes()
    if set(tensors) != set(expected):
        raise InvalidUpdateError(
            f"projection payload keys {sorted(tensors)} != expected {sorted(expected)}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        value = tensors[key]
        if tuple(value.shape) != shape:
            raise InvalidUpdateError(
                f"projection {key!r} has shape {list(value.shape)}, expected {list(shape)} "
                f"(num_classes={spec.num_classes}, text_dim={spec.text_dim}, "
                f"image_dim={spec.image_dim})"
            )
        if not (value.is_floating_point() or key.endswith("_count")):
            raise InvalidUpdateError(
                f"projection {key!r} must be floating point, got {value.dtype}"
            )
        as_float = value.to(torch.float64)
        if not bool(torch.isfinite(as_float).all()):
            raise InvalidUpdateError(f"projection {key!r} has non-finite values")
        if key.endswith("_count") and bool((as_float < 0).any()):
            raise InvalidUpdateError(f"projection {key!r} has negative counts")
        out[key] = as_float
    return out


def prototypes_payload(sums: Mapping[str, torch.Tensor]) -> bytes:
    """Safetensors payload of the global prototypes: the summed keys plus per-class means
    ``text_prototype``/``image_prototype`` (zero rows where a class was never seen)."""
    out = {k: sums[k].to(torch.float32).contiguous() for k in PROJECTION_KEYS}
    for side in ("text", "image"):
        counts = sums[f"{side}_count"].clamp_min(1e-12).unsqueeze(1)
        mean = torch.where(
            sums[f"{side}_count"].unsqueeze(1) > 0,
            sums[f"{side}_sum"] / counts,
            torch.zeros_like(sums[f"{side}_sum"]),
        )
        out[f"{side}_prototype"] = mean.to(torch.float32).contiguous()
    return encode_tensors(out)


class ProjectionAggregator:
    """Running sum of the projections received since the last publication (one per client
    and round); published as global prototypes when the next round commits."""

    def __init__(self, spec: ProjectionSpec) -> None:
        self.spec = spec
        self._sums = {k: torch.zeros(s, dtype=torch.float64) for k, s in spec.shapes().items()}
        self.contributors: set[tuple[str, int]] = set()

    def add(self, client_id: str, round_no: int, projections: Mapping[str, torch.Tensor]) -> bool:
        """Add a validated payload; False (ignored) if this client already sent this round's."""
        if (client_id, round_no) in self.contributors:
            return False
        for key in PROJECTION_KEYS:
            self._sums[key] += projections[key]
        self.contributors.add((client_id, round_no))
        return True

    def sums(self) -> dict[str, torch.Tensor]:
        """A copy of the current sums."""
        return {k: v.clone() for k, v in self._sums.items()}
