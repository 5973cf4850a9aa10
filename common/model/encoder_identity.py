"""Which frozen encoder (eq. 1) produced a federation's features: how it was asked for, its
weights identity and, for images, the size manifest images are resized to first. Clients
declare it at registration, the server pins it for the run, a model bundle records it, and
`crossfed evaluate` / `predict` refuse other weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from crossfed.v1 import common_pb2

#: Longest spec / identity string a peer may send (a directory path, a name + digest).
MAX_ENCODER_FIELD = 1024


class EncoderMismatchError(ValueError):
    """Features would come from other encoder weights than the ones a model was trained on."""


@dataclass(frozen=True)
class EncoderIdentity:
    """A frozen encoder as used: `spec` builds it, `identity` (name + weights digest) names
    its weights, `image_size` is the manifest image side length before E_i (0 for text)."""

    spec: str
    identity: str
    image_size: int = 0

    def __post_init__(self) -> None:
        if not self.identity:
            raise ValueError("an encoder identity needs its weights identity")
        if len(self.spec) > MAX_ENCODER_FIELD or len(self.identity) > MAX_ENCODER_FIELD:
            raise ValueError(f"encoder spec/identity longer than {MAX_ENCODER_FIELD} characters")
        if not 0 <= self.image_size <= 65_536:
            raise ValueError(f"image_size must be in 0..65536, got {self.image_size}")

    def same_weights(self, other: EncoderIdentity) -> bool:
        """Whether both produce the same features (the spec may differ: a path moves)."""
        return (self.identity, self.image_size) == (other.identity, other.image_size)

    def describe(self) -> str:
        """Short human form: the identity, plus the image size where there is one."""
        return self.identity + (f" at {self.image_size}px" if self.image_size else "")

    def to_proto(self) -> common_pb2.EncoderInfo:
        return common_pb2.EncoderInfo(
            spec=self.spec, identity=self.identity, image_size=self.image_size
        )

    @classmethod
    def from_proto(cls, message: common_pb2.EncoderInfo) -> EncoderIdentity | None:
        """The encoder a message names, None for an unset message (raises ValueError)."""
        if not message.identity and not message.spec:
            return None
        return cls(message.spec, message.identity, int(message.image_size))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EncoderIdentity:
        data: Any = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("encoder identity JSON must be an object")  # noqa: TRY004
        return cls(str(data["spec"]), str(data["identity"]), int(data.get("image_size", 0)))


def check_same_encoder(kind: str, expected: EncoderIdentity, actual: EncoderIdentity) -> None:
    """Raise EncoderMismatchError (one line) unless ``actual`` has ``expected``'s weights."""
    if not expected.same_weights(actual):
        raise EncoderMismatchError(
            f"the model was trained with {kind} encoder {expected.describe()} "
            f"(spec {expected.spec!r}), but {actual.spec!r} is {actual.describe()}; "
            f"use the same encoder weights (--{kind}-encoder)"
        )
