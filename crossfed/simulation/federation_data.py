"""A simulated federation's data: the dataset encoded ONCE with the frozen encoders through
the embedding cache (eq. 1), a seeded held-out split, a Dirichlet(alpha) label partition over
virtual clients, and missing modalities simulated per sample (PmcmFL) or per client
(FedMultimodal). Clients then train on embeddings only."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from crossfed.common.data.data_errors import DataError
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.data.label_partition import dirichlet_partition
from crossfed.common.data.missingness import (
    apply_client_modalities,
    per_client_modalities,
    per_sample_masks,
)
from crossfed.simulation.experiment import (
    BuiltinSimData,
    EmbeddingsSimData,
    ExperimentConfig,
    ManifestSimData,
    SimData,
)
from crossfed.simulation.simulation_errors import SimulationError

if TYPE_CHECKING:
    from crossfed.common.data.encoder_interface import ImageEncoder, TextEncoder

Missingness = Literal["per_sample", "per_client"]


@dataclass(frozen=True)
class FederationSetup:
    """One federation: how modalities go missing, how labels split, which seed."""

    missingness: Missingness
    rate: float
    alpha: float
    clients: int
    seed: int
    min_samples: int = 20

    @classmethod
    def of(cls, experiment: ExperimentConfig, seed: int) -> FederationSetup:
        fed = experiment.federation
        return cls(
            fed.missing.mode,
            fed.missing.rate,
            fed.dirichlet_alpha,
            fed.clients,
            seed,
            fed.min_samples_per_client,
        )

    def label(self) -> str:
        return (
            f"{self.missingness} rate={self.rate:g} alpha={self.alpha:g} "
            f"clients={self.clients} seed={self.seed}"
        )


@dataclass
class FederatedData:
    """Client shards (modalities already hidden), the test split, the training set with the
    same masks (unimodal ceilings) and without them (central paired upper bound)."""

    shards: list[EmbeddingSet]
    train: EmbeddingSet
    full_train: EmbeddingSet
    test: EmbeddingSet
    client_modalities: list[str]


@dataclass(frozen=True)
class LoadedData:
    """The encoded dataset and the names of its classes (label index order)."""

    embeddings: EmbeddingSet
    class_names: tuple[str, ...]


def load_data(spec: SimData, progress: bool = False) -> LoadedData:
    """Encode (or read) the experiment's dataset once; later runs hit the embedding cache."""
    try:
        if isinstance(spec, EmbeddingsSimData):
            data = EmbeddingSet.load(spec.path)
            classes = int(data.labels.max()) + 1 if len(data) else 0
            return LoadedData(data, tuple(str(i) for i in range(classes)))
        if isinstance(spec, BuiltinSimData):
            return _load_builtin(spec, progress)
        return _load_manifest(spec, progress)
    except DataError as exc:
        raise SimulationError(f"cannot load the experiment's data: {exc}") from exc


def _encoders(spec: BuiltinSimData | ManifestSimData) -> tuple[TextEncoder, ImageEncoder]:
    from crossfed.common.model.encoders import build_image_encoder, build_text_encoder

    return build_text_encoder(spec.text_encoder), build_image_encoder(spec.image_encoder)


def _load_builtin(spec: BuiltinSimData, progress: bool) -> LoadedData:
    """Synthetic shapes encoded once; the assembled set is kept beside the cache entries."""
    from crossfed.common.data.embedding_cache import EmbeddingCache, encode_dataset
    from crossfed.common.data.synthetic_shapes import (
        SyntheticShapesConfig,
        class_names,
        generate_synthetic_shapes,
    )

    text_enc, image_enc = _encoders(spec)
    key = hashlib.sha256(
        f"{spec.num_samples}|{spec.seed}|{spec.image_size}|{text_enc.identity}|"
        f"{image_enc.identity}".encode()
    )
    assembled = spec.cache_dir / f"simulation-shapes-{key.hexdigest()[:16]}.safetensors"
    names = tuple(class_names())
    if assembled.is_file():
        return LoadedData(EmbeddingSet.load(assembled), names)
    raw = generate_synthetic_shapes(
        SyntheticShapesConfig(
            num_samples=spec.num_samples, seed=spec.seed, image_size=spec.image_size
        )
    )
    data = encode_dataset(raw, text_enc, image_enc, EmbeddingCache(spec.cache_dir), progress)
    data.save(assembled)
    return LoadedData(data, names)


def _load_manifest(spec: ManifestSimData, progress: bool) -> LoadedData:
    from crossfed.common.data.embedding_cache import EmbeddingCache, encode_dataset
    from crossfed.common.data.manifest import load_manifest

    result = load_manifest(
        spec.path,
        class_names=spec.class_names,
        image_size=spec.image_size,
        strict=not spec.skip_bad_rows,
    )
    raw = result.dataset
    if len(raw) == 0:
        raise SimulationError(f"{spec.path}: no usable rows")
    text_enc, image_enc = _encoders(spec)
    data = encode_dataset(raw, text_enc, image_enc, EmbeddingCache(spec.cache_dir), progress)
    names = tuple(raw.class_names) or tuple(str(i) for i in range(raw.num_classes))
    return LoadedData(data, names)


def split_train_test(
    data: EmbeddingSet, test_fraction: float, seed: int
) -> tuple[EmbeddingSet, EmbeddingSet]:
    """Seeded held-out split; the test split keeps what each row holds (Table I is evaluated
    by hiding a modality at inference)."""
    if not 0.0 < test_fraction < 1.0:
        raise SimulationError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = torch.from_numpy(np.random.default_rng(1000 + seed).permutation(len(data)))
    n_test = int(len(data) * test_fraction)
    if n_test == 0 or n_test == len(data):
        raise SimulationError(
            f"{len(data)} samples with test_fraction {test_fraction:g} leave no test or no "
            "training rows"
        )
    return data.subset(order[n_test:]), data.subset(order[:n_test])


def _kind(has_t: bool, has_i: bool) -> str:
    return "both" if has_t and has_i else "text" if has_t else "image"


def build_federation(
    data: EmbeddingSet, setup: FederationSetup, test_fraction: float
) -> FederatedData:
    """Split, partition labels by Dirichlet(alpha) and hide modalities per the setup.

    Simulated missingness removes modalities on top of what the rows already lack (a
    manifest's empty cells), but never a row's only modality.
    """
    if setup.clients < 1:
        raise SimulationError(f"clients must be >= 1, got {setup.clients}")
    train, test = split_train_test(data, test_fraction, setup.seed)
    labels = train.labels.numpy()
    try:
        parts = dirichlet_partition(
            labels, setup.clients, setup.alpha, setup.seed, min_samples=setup.min_samples
        )
        if setup.missingness == "per_sample":
            masks = per_sample_masks(len(train), setup.rate, setup.seed)
            kinds = ["mixed"] * setup.clients
        elif setup.missingness == "per_client":
            mods = per_client_modalities(setup.clients, setup.rate, setup.seed)
            masks = apply_client_modalities(parts, mods, len(train))
            kinds = [_kind(t, i) for t, i in mods]
        else:
            raise SimulationError(
                f"missingness must be 'per_sample' or 'per_client', got {setup.missingness!r}"
            )
    except DataError as exc:
        raise SimulationError(f"cannot build the federation ({setup.label()}): {exc}") from exc
    has_text = train.has_text & torch.from_numpy(masks.has_text)
    has_image = train.has_image & torch.from_numpy(masks.has_image)
    lost = ~(has_text | has_image)  # a row holding one modality keeps it
    masked = train.with_masks(
        has_text | (lost & train.has_text), has_image | (lost & train.has_image)
    )
    shards = [masked.subset(torch.from_numpy(p)) for p in parts]
    return FederatedData(
        shards=shards, train=masked, full_train=train, test=test, client_modalities=kinds
    )


def only_modality(data: EmbeddingSet, modality: Literal["text", "image"]) -> EmbeddingSet:
    """Every sample that has `modality`, with the other hidden (unimodal ceiling's data)."""
    keep = data.has_text if modality == "text" else data.has_image
    sub = data.subset(keep.nonzero().squeeze(1))
    none = torch.zeros(len(sub), dtype=torch.bool)
    return sub.with_masks(
        sub.has_text if modality == "text" else none,
        sub.has_image if modality == "image" else none,
    )


def shards_with(
    shards: list[EmbeddingSet], modality: Literal["text", "image"]
) -> list[EmbeddingSet]:
    """Each client's rows holding `modality` (the other hidden); clients without any drop out."""
    kept = [only_modality(s, modality) for s in shards]
    return [s for s in kept if len(s)]
