"""A trained model as one self-contained file: everything `crossfed evaluate` / `predict`
need to use a federation's global model on new data, and nothing a peer could abuse.

One safetensors file (never pickle): tensors ``model/<key>`` (the shareable global state,
calibration layers included when fitted) and ``prototypes/<key>`` (the global prototypes of
eq. 16, the VLMR entries a text-only row retrieves at inference), plus string metadata: the
ModelConfig, the ordered class names, the text and image encoders (spec, weights identity,
image size), the round, the run id and the run's epsilon. `load_bundle` checks all of it and
says in one line what does not fit.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from crossfed.common.data.class_list import ClassListError, check_class_names
from crossfed.common.model.encoder_identity import EncoderIdentity
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.model_construction import model_to_load
from crossfed.common.model.model_errors import ModelError
from crossfed.common.model.network import CrossModalNet
from crossfed.common.model.prototypes import ClassPrototypes, apply_global_prototypes
from crossfed.common.wire.errors import WireError
from crossfed.common.wire.tensor_codec import decode_tensors, payload_pieces
from pydantic import ValidationError

BUNDLE_FORMAT = "crossfed.ModelBundle"
BUNDLE_VERSION = 1
MODEL_PREFIX = "model/"
PROTOTYPES_PREFIX = "prototypes/"
#: Largest bundle file `load_bundle` reads (a model of the configured size is a few MB).
MAX_BUNDLE_BYTES = 4 * 1024**3


class BundleError(ModelError):
    """A model bundle is unreadable, incomplete, inconsistent, or does not fit its use."""


@dataclass(frozen=True)
class ModelBundle:
    """A federation's global model with what inference needs beside the weights."""

    state: dict[str, torch.Tensor]
    model_config: ModelConfig
    class_names: tuple[str, ...]
    text_encoder: EncoderIdentity | None = None
    image_encoder: EncoderIdentity | None = None
    prototypes: ClassPrototypes | None = None
    round: int = 0
    run_id: str = ""
    epsilon: float = 0.0
    delta: float = 0.0
    created_unix_s: float = field(default_factory=time.time)

    def metadata(self) -> dict[str, str]:
        """The string metadata stored in the safetensors header."""
        encoders = {
            "text": None if self.text_encoder is None else json.loads(self.text_encoder.to_json()),
            "image": None
            if self.image_encoder is None
            else json.loads(self.image_encoder.to_json()),
        }
        return {
            "format": BUNDLE_FORMAT,
            "version": str(BUNDLE_VERSION),
            "model_config": self.model_config.model_dump_json(),
            "class_names": json.dumps(list(self.class_names)),
            "encoders": json.dumps(encoders, sort_keys=True),
            "round": str(self.round),
            "run_id": self.run_id,
            "epsilon": repr(self.epsilon),
            "delta": repr(self.delta),
            "created_unix_s": repr(self.created_unix_s),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {MODEL_PREFIX + k: v.contiguous() for k, v in self.state.items()}
        if self.prototypes is not None:
            for key, value in self.prototypes.to_tensors().items():
                out[PROTOTYPES_PREFIX + key] = value
        return out

    def pieces(self) -> list[memoryview | bytes]:
        """The file's bytes in pieces (concatenated: a safetensors payload)."""
        return list(payload_pieces(self.tensors(), self.metadata()))

    def encode(self) -> bytes:
        return b"".join(self.pieces())

    def build_model(self) -> CrossModalNet:
        """The network in eval mode: global weights, and the global prototypes as its VLMR
        entries (what a new client holds after the round)."""
        model = model_to_load(self.model_config)
        model.load_shareable_state_dict(self.state)
        if self.prototypes is not None:
            apply_global_prototypes(model, self.prototypes)
        return model.eval()

    def describe(self) -> str:
        """One line for people: round, classes, encoders, epsilon."""
        eps = f", epsilon {self.epsilon:.2f} at delta {self.delta:g}" if self.epsilon else ""
        encoders = ", ".join(
            f"{kind} {enc.identity}"
            for kind, enc in (("text", self.text_encoder), ("image", self.image_encoder))
            if enc is not None
        )
        return (
            f"round {self.round} of run {self.run_id or '?'}, {len(self.class_names)} classes"
            f"{', ' + encoders if encoders else ''}{eps}"
        )


def _fail(where: str, problem: str) -> BundleError:
    return BundleError(f"{where}: {problem}")


def _meta_json(meta: Mapping[str, str], key: str, where: str) -> object:
    if key not in meta:
        raise _fail(where, f"metadata lacks {key!r}")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise _fail(where, f"metadata {key!r} is not JSON ({exc.msg})") from None


def _encoder(raw: object, kind: str, where: str) -> EncoderIdentity | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _fail(where, f"{kind} encoder entry is not an object")
    try:
        return EncoderIdentity(
            str(raw["spec"]), str(raw["identity"]), int(raw.get("image_size", 0))
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _fail(where, f"{kind} encoder entry is malformed ({exc})") from None


def _number(meta: Mapping[str, str], key: str, where: str, kind: type[float | int]) -> float:
    try:
        value = kind(meta.get(key, "0"))
    except ValueError:
        raise _fail(where, f"metadata {key!r} is not a number: {meta.get(key)!r}") from None
    if not math.isfinite(value) or value < 0:
        raise _fail(where, f"metadata {key!r} must be finite and >= 0, got {value}")
    return value


def decode_bundle(data: bytes | memoryview, where: str = "bundle") -> ModelBundle:
    """Parse and check a bundle's bytes; every problem is one BundleError line."""
    try:
        from crossfed.common.wire.tensor_codec import decode_metadata

        meta = decode_metadata(data)
        tensors = decode_tensors(data)
    except WireError as exc:
        raise _fail(where, f"not a safetensors file ({exc})") from None
    if meta.get("format") != BUNDLE_FORMAT:
        hint = (
            " (a bare checkpoint? export a bundle with `crossfed admin export-model`, or use "
            "state/checkpoints/bundle-*.safetensors)"
            if tensors and not any(k.startswith(MODEL_PREFIX) for k in tensors)
            else ""
        )
        raise _fail(where, f"not a crossfed model bundle{hint}")
    if meta.get("version") != str(BUNDLE_VERSION):
        raise _fail(
            where, f"bundle version {meta.get('version')!r}; this crossfed reads {BUNDLE_VERSION}"
        )
    try:
        config = ModelConfig.model_validate_json(meta.get("model_config", ""))
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise _fail(where, f"model_config {loc}: {first['msg']}") from None
    names = _meta_json(meta, "class_names", where)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _fail(where, "class_names must be a list of strings")
    try:
        class_names = tuple(check_class_names(names))
    except ClassListError as exc:
        raise _fail(where, str(exc)) from None
    if len(class_names) != config.num_classes:
        raise _fail(where, f"{len(class_names)} class names for a {config.num_classes}-class model")
    encoders = _meta_json(meta, "encoders", where)
    if not isinstance(encoders, dict):
        raise _fail(where, "encoders must be an object")
    state = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    protos = {
        k[len(PROTOTYPES_PREFIX) :]: v
        for k, v in tensors.items()
        if k.startswith(PROTOTYPES_PREFIX)
    }
    stray = sorted(k for k in tensors if not k.startswith((MODEL_PREFIX, PROTOTYPES_PREFIX)))
    if stray:
        raise _fail(where, f"unexpected tensors {stray[:3]}")
    bad = [
        k
        for k, v in {**state, **protos}.items()
        if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise _fail(where, f"non-finite values in {sorted(bad)[:3]}")
    try:
        prototypes = ClassPrototypes.from_tensors(protos) if protos else None
        bundle = ModelBundle(
            state=state,
            model_config=config,
            class_names=class_names,
            text_encoder=_encoder(encoders.get("text"), "text", where),
            image_encoder=_encoder(encoders.get("image"), "image", where),
            prototypes=prototypes,
            round=int(_number(meta, "round", where, int)),
            run_id=meta.get("run_id", ""),
            epsilon=_number(meta, "epsilon", where, float),
            delta=_number(meta, "delta", where, float),
            created_unix_s=_number(meta, "created_unix_s", where, float),
        )
        bundle.build_model()  # keys, shapes and prototype class count must fit the config
    except ModelError as exc:
        raise _fail(where, str(exc)) from None
    return bundle


def load_bundle(path: str | Path) -> ModelBundle:
    """Read and check a bundle file (see `decode_bundle`)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise _fail(str(path), "not a regular file")
        if size > MAX_BUNDLE_BYTES:
            raise _fail(str(path), f"{size} bytes, over the {MAX_BUNDLE_BYTES}-byte limit")
        data = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path}: no such file") from None
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode_bundle(data, str(path))
