"""EmbeddingSet: the cached f_t / f_i (eq. 1) of a dataset, the unit clients train on.

Absent modalities are stored as zero rows plus a boolean presence mask, so one set can mix
paired, text-only and image-only samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from crossfed.common import atomic_files
from crossfed.common.data.data_errors import EmbeddingSetError
from safetensors import SafetensorError
from safetensors.torch import load_file, save

_FIELDS = ("text", "image", "has_text", "has_image", "labels")


@dataclass
class EmbeddingSet:
    """Per-sample embeddings and presence masks; absent rows hold zeros."""

    text: torch.Tensor  # [N, text_dim] float32
    image: torch.Tensor  # [N, image_dim] float32
    has_text: torch.Tensor  # [N] bool
    has_image: torch.Tensor  # [N] bool
    labels: torch.Tensor  # [N] int64
    # Optional f^_i precomputed outside the network (SD mode: generated images through E_i).
    recovered_image: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.labels.shape[0] if self.labels.dim() == 1 else -1
        if n < 0:
            raise EmbeddingSetError(f"labels must be 1-D, got shape {tuple(self.labels.shape)}")
        checks = {
            "text": (self.text, 2, torch.float32),
            "image": (self.image, 2, torch.float32),
            "has_text": (self.has_text, 1, torch.bool),
            "has_image": (self.has_image, 1, torch.bool),
            "labels": (self.labels, 1, torch.int64),
        }
        for name, (tensor, ndim, dtype) in checks.items():
            if tensor.dim() != ndim or tensor.shape[0] != n:
                raise EmbeddingSetError(
                    f"{name} has shape {tuple(tensor.shape)}; expected {ndim}-D with {n} rows"
                )
            if tensor.dtype != dtype:
                raise EmbeddingSetError(f"{name} has dtype {tensor.dtype}; expected {dtype}")
        if self.recovered_image is not None and self.recovered_image.shape != self.image.shape:
            raise EmbeddingSetError(
                f"recovered_image has shape {tuple(self.recovered_image.shape)}"
                f"; expected {tuple(self.image.shape)}"
            )
        if bool((~self.has_text & ~self.has_image).any()):
            bad = int((~self.has_text & ~self.has_image).nonzero()[0, 0])
            raise EmbeddingSetError(f"sample {bad} has neither text nor image")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def text_dim(self) -> int:
        return int(self.text.shape[1])

    @property
    def image_dim(self) -> int:
        return int(self.image.shape[1])

    def subset(self, indices: torch.Tensor | Sequence[int]) -> EmbeddingSet:
        """Rows at `indices` (a new set; tensors are copies, not views)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return EmbeddingSet(
            text=self.text[idx].clone(),
            image=self.image[idx].clone(),
            has_text=self.has_text[idx].clone(),
            has_image=self.has_image[idx].clone(),
            labels=self.labels[idx].clone(),
            recovered_image=None
            if self.recovered_image is None
            else self.recovered_image[idx].clone(),
        )

    def with_masks(self, has_text: torch.Tensor, has_image: torch.Tensor) -> EmbeddingSet:
        """Same samples with modalities hidden where the new masks are False (rows zeroed).

        A mask may only remove a modality, never invent one the set lacks.
        """
        if bool((has_text & ~self.has_text).any()) or bool((has_image & ~self.has_image).any()):
            raise EmbeddingSetError("with_masks cannot mark a modality present that is absent")
        return EmbeddingSet(
            text=self.text * has_text.unsqueeze(1).to(self.text.dtype),
            image=self.image * has_image.unsqueeze(1).to(self.image.dtype),
            has_text=has_text.clone(),
            has_image=has_image.clone(),
            labels=self.labels.clone(),
            recovered_image=self.recovered_image,
        )

    def counts(self) -> dict[str, int]:
        """How many samples are paired / text-only / image-only."""
        t, i = self.has_text, self.has_image
        return {
            "paired": int((t & i).sum()),
            "text_only": int((t & ~i).sum()),
            "image_only": int((~t & i).sum()),
        }

    def save(self, path: str | Path) -> None:
        """Write as safetensors atomically (temp file + rename), never pickle."""
        tensors = {name: getattr(self, name).contiguous() for name in _FIELDS}
        if self.recovered_image is not None:
            tensors["recovered_image"] = self.recovered_image.contiguous()
        data = save(tensors, metadata={"format": "crossfed.EmbeddingSet/1"})
        atomic_files.write_atomic(Path(path), data)

    @classmethod
    def load(cls, path: str | Path) -> EmbeddingSet:
        """Read a set written by save(); a missing/corrupt/incomplete file raises EmbeddingSetError."""
        path = Path(path)
        if not path.is_file():
            raise EmbeddingSetError(f"embedding set file not found: {path}")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise EmbeddingSetError(f"cannot read embedding set {path}: {exc}") from exc
        missing = [name for name in _FIELDS if name not in tensors]
        if missing:
            raise EmbeddingSetError(f"embedding set {path} lacks tensors {missing}")
        return cls(
            **{name: tensors[name] for name in _FIELDS},
            recovered_image=tensors.get("recovered_image"),
        )
