"""Projection exchange (eq. 16): per-class sums/counts of f_t and f_i uploaded by clients are
added into global prototypes that every client receives. A `ProjectionNoiseHook` lets the
privacy code add server-side noise / accounting before prototypes are published."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from crossfed.common.model.prototypes import PROTOTYPE_KEYS
from crossfed.common.wire.errors import WireError
from crossfed.common.wire.tensor_codec import decode_tensors, encode_tensors
from crossfed.server.errors import InvalidUpdateError


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


#: Tail of the noise norm a projection row may carry beyond sqrt(d) noise stds: a Gaussian
#: vector passes sqrt(d) + 8 stds with probability < e^-32.
NOISE_NORM_TAIL = 8.0


@dataclass(frozen=True)
class ProjectionLimits:
    """How large one client's projection release may be (bounded influence on eq. 16)."""

    clip_norm: float  # C: a class mean, before noise, has L2 norm <= C
    noise_std: float  # sigma * C of the mandated noise (0: exact projections)
    max_count: float  # largest count of one class row (1 under DP: presence)
    max_total: float  # the counts of one modality add up to at most this (registered rows)

    def row_bound(self, dim: int) -> float:
        """Longest mean row a release may carry: C plus the noise's norm tail."""
        return self.clip_norm + self.noise_std * (math.sqrt(dim) + NOISE_NORM_TAIL)


def bound_projections(
    projections: Mapping[str, torch.Tensor], limits: ProjectionLimits
) -> tuple[dict[str, torch.Tensor], int]:
    """Counts checked (whole numbers within the limits, else `InvalidUpdateError`) and every
    sum row clipped to count x `ProjectionLimits.row_bound` (a row of count 0 becomes zero);
    returns the bounded payload and how many rows were clipped. Bounded rows keep the
    prototypes (sums over clients, divided by whole counts >= 1) finite in float32."""
    out = dict(projections)
    clipped = 0
    for side in ("text", "image"):
        counts = projections[f"{side}_count"]
        if not bool((counts == counts.round()).all()) or bool((counts > limits.max_count).any()):
            raise InvalidUpdateError(
                f"projection {side}_count must hold whole numbers in [0, {limits.max_count:g}]"
                f" per class, got {counts.tolist()}"
            )
        if float(counts.sum()) > limits.max_total:
            raise InvalidUpdateError(
                f"projection {side}_count adds up to {float(counts.sum()):g}, more than the "
                f"{limits.max_total:g} samples this client registered"
            )
        sums = projections[f"{side}_sum"]
        bound = counts * limits.row_bound(int(sums.shape[1]))
        largest = sums.abs().amax(dim=1).clamp_min(1e-300)  # scaled: 1e300 rows do not overflow
        norms = largest * torch.linalg.vector_norm(sums / largest.unsqueeze(1), dim=1)
        over = norms > bound
        clipped += int(over.sum())
        scale = torch.where(over, bound / norms, torch.ones_like(norms))
        out[f"{side}_sum"] = sums * scale.unsqueeze(1)
    return out, clipped


def prototypes_payload(sums: Mapping[str, torch.Tensor]) -> bytes:
    """Safetensors payload of the global prototypes: the summed keys plus per-class means
    ``text_prototype``/``image_prototype`` (zero rows where a class was never seen)."""
    out = {k: sums[k].to(torch.float32).contiguous() for k in PROTOTYPE_KEYS}
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

    def has(self, client_id: str, round_no: int) -> bool:
        """Whether this client's payload of this round is already in the sums."""
        return (client_id, round_no) in self.contributors

    def add(self, client_id: str, round_no: int, projections: Mapping[str, torch.Tensor]) -> bool:
        """Add a validated payload; False (ignored) if this client already sent this round's."""
        if (client_id, round_no) in self.contributors:
            return False
        for key in PROTOTYPE_KEYS:
            self._sums[key] += projections[key]
        self.contributors.add((client_id, round_no))
        return True

    def sums(self) -> dict[str, torch.Tensor]:
        """A copy of the current sums."""
        return {k: v.clone() for k, v in self._sums.items()}
