"""A client's local data: load (built-in shapes shard, manifest, or pre-encoded set), hide the
modalities this client lacks (Table I configuration), encode once through the embedding cache
(eq. 1) and split off a local held-out part for evaluating the global model."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from crossfed.client.errors import ClientConfigError
from crossfed.common.data.class_list import ClassListError, describe_difference, relabel_map
from crossfed.common.data.data_errors import DataError
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.data.manifest import MANIFEST_SUFFIXES, load_manifest
from crossfed.common.data.raw_dataset import RawDataset
from crossfed.common.model.encoder_identity import EncoderIdentity
from crossfed.v1 import common_pb2

log = logging.getLogger(__name__)

BUILTIN_SOURCE = "builtin:shapes"


class ClientModality(str, Enum):
    """Which modalities this client holds (Table I)."""

    BOTH = "both"
    TEXT_ONLY = "text_only"
    IMAGE_ONLY = "image_only"

    @property
    def proto(self) -> int:
        """The crossfed.v1.ModalityConfig value."""
        return {
            ClientModality.BOTH: common_pb2.MODALITY_CONFIG_BOTH,
            ClientModality.TEXT_ONLY: common_pb2.MODALITY_CONFIG_TEXT_ONLY,
            ClientModality.IMAGE_ONLY: common_pb2.MODALITY_CONFIG_IMAGE_ONLY,
        }[self]


@dataclass(frozen=True)
class LocalDataSpec:
    """Where a client's samples come from and how they are shaped into its local set."""

    source: str = BUILTIN_SOURCE  # builtin:shapes | *.csv | *.jsonl | *.safetensors
    modality: ClientModality = ClientModality.BOTH
    # Built-in benchmark: every client regenerates the same dataset and keeps its shard.
    num_samples: int = 20_000
    num_clients: int = 1
    client_index: int = 0
    dirichlet_alpha: float = 0.5
    seed: int = 0
    # Per-sample missingness inside this client's shard (PmcmFL style, BOTH clients only).
    missing_rate: float = 0.0
    holdout_fraction: float = 0.2
    text_encoder: str = "minilm"
    image_encoder: str = "cnn"
    image_size: int = 32
    # Manifests: the federation's shared class list, and whether bad rows are skipped.
    class_names: tuple[str, ...] | None = None
    skip_bad_rows: bool = False
    # Keep captions and images beside the embeddings (Stable Diffusion recovery generates
    # from the captions and fine-tunes on the paired images); pre-encoded sets have none.
    keep_raw: bool = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "modality", ClientModality(self.modality))
        except ValueError:
            choices = ", ".join(m.value for m in ClientModality)
            raise ClientConfigError(f"modality {self.modality!r} is not one of {choices}") from None
        if not 0 <= self.client_index < self.num_clients:
            raise ClientConfigError(
                f"client index {self.client_index} is outside 0..{self.num_clients - 1}"
            )
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ClientConfigError(
                f"holdout fraction must be in [0, 1), got {self.holdout_fraction}"
            )


@dataclass(frozen=True)
class LocalData:
    """The encoded local training set and the held-out part (same modality configuration),
    with what Register declares: the class names its labels index, and the encoders."""

    train: EmbeddingSet
    holdout: EmbeddingSet
    modality: ClientModality
    description: str
    # Names the label indices refer to; None for pre-encoded sets (indices as they stand).
    class_names: tuple[str, ...] | None = None
    # False: `class_names` is this manifest's own label set, to be mapped onto the
    # federation's classes after registration (`for_federation`); True: already the
    # federation's list (the built-in data, or --classes).
    labels_final: bool = True
    text_encoder: EncoderIdentity | None = None
    image_encoder: EncoderIdentity | None = None

    # Row-aligned raw samples of train / holdout (LocalDataSpec.keep_raw), with this client's
    # modality masks applied; None otherwise.
    train_raw: RawDataset | None = None
    holdout_raw: RawDataset | None = None

    def for_federation(self, class_names: Sequence[str]) -> LocalData:
        """This data with labels indexing the federation's ``class_names`` (from Register);
        raises ClientConfigError naming the labels or list entries that do not fit."""
        if self.class_names is None or (self.labels_final and not class_names):
            return self
        if not class_names:
            raise ClientConfigError(
                "the server sent no class list to map this manifest's label names onto; "
                "give the federation's classes (--classes a,b,c)"
            )
        if self.labels_final:
            difference = describe_difference(self.class_names, class_names)
            if difference:
                raise ClientConfigError(
                    f"this client's class list {difference} compared with the federation's"
                )
            return self
        try:
            mapping = torch.tensor(relabel_map(self.class_names, class_names), dtype=torch.long)
        except ClassListError as exc:
            raise ClientConfigError(str(exc)) from None
        return replace(
            self,
            train=replace(self.train, labels=mapping[self.train.labels]),
            holdout=replace(self.holdout, labels=mapping[self.holdout.labels]),
            class_names=tuple(class_names),
            labels_final=True,
        )


def _builtin_shard(spec: LocalDataSpec) -> RawDataset:
    from crossfed.common.data.label_partition import dirichlet_partition
    from crossfed.common.data.synthetic_shapes import (
        SyntheticShapesConfig,
        generate_synthetic_shapes,
    )

    raw = generate_synthetic_shapes(
        SyntheticShapesConfig(
            num_samples=spec.num_samples, seed=spec.seed, image_size=spec.image_size
        )
    )
    shards = dirichlet_partition(
        raw.labels, spec.num_clients, spec.dirichlet_alpha, seed=spec.seed, min_samples=2
    )
    return raw.subset(shards[spec.client_index])


def _load_raw(spec: LocalDataSpec) -> RawDataset:
    """The raw rows; a manifest without a class list keeps its own label names (mapped onto
    the federation's classes after registration), and skipped rows are summed up in one line."""
    if spec.source == BUILTIN_SOURCE:
        return _builtin_shard(spec)
    path = Path(spec.source)
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        result = load_manifest(
            path,
            class_names=spec.class_names,
            image_size=spec.image_size,
            strict=not spec.skip_bad_rows,
        )
        for issue in result.issues:
            log.debug("%s: skipped %s", path, issue)
        if result.issues:
            log.warning("%s", result.skipped_summary(path))
        return result.dataset
    raise ClientConfigError(
        f"data source {spec.source!r} is not {BUILTIN_SOURCE!r}, a .csv/.jsonl manifest "
        "or a .safetensors embedding set"
    )


def _modality_masks(
    has_text: torch.Tensor, has_image: torch.Tensor, spec: LocalDataSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide what this client does not hold; optionally drop one modality per sample."""
    if spec.modality is ClientModality.TEXT_ONLY:
        return has_text.clone(), torch.zeros_like(has_image)
    if spec.modality is ClientModality.IMAGE_ONLY:
        return torch.zeros_like(has_text), has_image.clone()
    if spec.missing_rate > 0:
        from crossfed.common.data.missingness import per_sample_masks

        masks = per_sample_masks(len(has_text), spec.missing_rate, seed=spec.seed + 7919)
        return (
            has_text & torch.from_numpy(masks.has_text),
            has_image & torch.from_numpy(masks.has_image),
        )
    return has_text.clone(), has_image.clone()


def _encode(
    raw: RawDataset, spec: LocalDataSpec, cache_dir: Path | None, progress: bool
) -> tuple[EmbeddingSet, EncoderIdentity | None, EncoderIdentity | None]:
    """Eq. 1 over the rows this client holds, with the identities of the encoders used."""
    from crossfed.common.data.embedding_cache import EmbeddingCache, encode_dataset
    from crossfed.common.model.encoders import build_image_encoder, build_text_encoder

    # Encode only what this client holds: a text-only client never runs E_i (eq. 1).
    has_text, has_image = _modality_masks(
        torch.from_numpy(raw.has_text.astype(bool)),
        torch.from_numpy(raw.has_image.astype(bool)),
        spec,
    )
    raw.has_text = has_text.numpy().copy()
    raw.has_image = has_image.numpy().copy()
    cache = EmbeddingCache(cache_dir) if cache_dir is not None else None
    text_encoder = build_text_encoder(spec.text_encoder)
    image_encoder = build_image_encoder(spec.image_encoder)
    data = encode_dataset(raw, text_encoder, image_encoder, cache=cache, progress=progress)
    text_id = EncoderIdentity(spec.text_encoder, text_encoder.identity)
    image_id = EncoderIdentity(spec.image_encoder, image_encoder.identity, spec.image_size)
    return (
        data,
        text_id if bool(has_text.any()) else None,
        image_id if bool(has_image.any()) else None,
    )


def _split_holdout(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of the training and the held-out part."""
    n_holdout = round(fraction * n)
    if n - n_holdout < 1:
        raise ClientConfigError(f"{n} local samples leave nothing to train on")
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    return order[n_holdout:], order[:n_holdout]


def load_local_data(
    spec: LocalDataSpec, cache_dir: Path | None = None, progress: bool = False
) -> LocalData:
    """Build this client's encoded train/holdout sets; bad input raises ClientConfigError."""
    class_names: tuple[str, ...] | None = None
    labels_final = True
    text_id = image_id = None
    raw: RawDataset | None = None
    try:
        if spec.source.endswith(".safetensors"):
            if spec.keep_raw:
                raise ClientConfigError(
                    f"{spec.source} is a pre-encoded embedding set: it holds no captions or "
                    "images, which Stable Diffusion recovery needs (give a manifest instead)"
                )
            loaded = EmbeddingSet.load(spec.source)
            masks = _modality_masks(loaded.has_text, loaded.has_image, spec)
            data = loaded.with_masks(*masks)
        else:
            raw = _load_raw(spec)
            class_names = tuple(raw.class_names) or None
            labels_final = spec.source == BUILTIN_SOURCE or spec.class_names is not None
            data, text_id, image_id = _encode(raw, spec, cache_dir, progress)
    except DataError as exc:
        raise ClientConfigError(f"cannot load local data from {spec.source}: {exc}") from exc
    rows = torch.nonzero(data.has_text | data.has_image).flatten()  # drop rows left empty
    if len(rows) < len(data):
        data = data.subset(rows)
    if len(data) == 0:
        raise ClientConfigError(
            f"no samples left for a {spec.modality.value} client in {spec.source}"
        )
    train_rows, holdout_rows = _split_holdout(
        len(data), spec.holdout_fraction, spec.seed + spec.client_index
    )
    train, holdout = data.subset(train_rows), data.subset(holdout_rows)
    train_raw = holdout_raw = None
    if raw is not None and spec.keep_raw:
        train_raw = raw.subset(rows[train_rows].numpy())
        holdout_raw = raw.subset(rows[holdout_rows].numpy())
    counts = train.counts()
    modality = modality_of(counts)
    description = (
        f"{spec.source} [{modality.value}] train={len(train)} holdout={len(holdout)} "
        f"paired={counts['paired']} text_only={counts['text_only']} "
        f"image_only={counts['image_only']}"
    )
    return LocalData(
        train=train,
        holdout=holdout,
        modality=modality,
        description=description,
        class_names=class_names,
        labels_final=labels_final,
        text_encoder=text_id,
        image_encoder=image_id,
        train_raw=train_raw,
        holdout_raw=holdout_raw,
    )


def modality_of(counts: dict[str, int]) -> ClientModality:
    """The Table I configuration a set of rows amounts to (a manifest's rows decide it)."""
    text = counts["paired"] + counts["text_only"] > 0
    image = counts["paired"] + counts["image_only"] > 0
    if text and image:
        return ClientModality.BOTH
    return ClientModality.TEXT_ONLY if text else ClientModality.IMAGE_ONLY
