"""Class projections for the projection exchange (eq. 16).

A client uploads per-class sums and counts of its f_t and f_i (DP noise is added by the
privacy layer, aggregation by the server: global prototypes are these sums added over
clients). Clients use the global prototypes as extra VLMR entries (eq. 10), so a text-only
client -- whose own memory can never hold image features -- still retrieves image-side
knowledge per class. Raw f_t / f_i are projected (not D_i outputs) because those are exactly
what VLMR stores and returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.model_errors import ModelInputError
from crossfed.common.model.network import CrossModalNet

PROTOTYPE_KEYS = ("text_sum", "image_sum", "text_count", "image_count")


@dataclass
class ClassPrototypes:
    """Per-class sums and counts of f_t and f_i (counts float: DP noise may be added)."""

    text_sum: torch.Tensor  # [C, text_dim]
    image_sum: torch.Tensor  # [C, image_dim]
    text_count: torch.Tensor  # [C]
    image_count: torch.Tensor  # [C]

    def __post_init__(self) -> None:
        c = self.text_sum.shape[0]
        if (
            self.image_sum.shape[0] != c
            or self.text_count.shape != (c,)
            or self.image_count.shape != (c,)
        ):
            raise ModelInputError(
                f"prototype shapes disagree: text_sum {tuple(self.text_sum.shape)}, image_sum "
                f"{tuple(self.image_sum.shape)}, counts {tuple(self.text_count.shape)} / "
                f"{tuple(self.image_count.shape)}"
            )

    @property
    def num_classes(self) -> int:
        return int(self.text_sum.shape[0])

    def means(self, min_count: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class means of f_t and f_i; zero rows where a class has < min_count samples."""

        def mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
            ok = (count >= min_count).unsqueeze(1)
            return torch.where(
                ok, total / count.clamp_min(min_count).unsqueeze(1), torch.zeros_like(total)
            )

        return mean(self.text_sum, self.text_count), mean(self.image_sum, self.image_count)

    def __add__(self, other: ClassPrototypes) -> ClassPrototypes:
        return ClassPrototypes(
            self.text_sum + other.text_sum,
            self.image_sum + other.image_sum,
            self.text_count + other.text_count,
            self.image_count + other.image_count,
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The wire form (keys text_sum, image_sum, text_count, image_count), float32."""
        return {k: getattr(self, k).to(torch.float32).contiguous() for k in PROTOTYPE_KEYS}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> ClassPrototypes:
        missing = [k for k in PROTOTYPE_KEYS if k not in tensors]
        if missing:
            raise ModelInputError(f"prototype tensors lack {missing}")
        return cls(**{k: tensors[k].to(torch.float32) for k in PROTOTYPE_KEYS})


def compute_class_projections(model: CrossModalNet, data: EmbeddingSet) -> ClassPrototypes:
    """What a client uploads (eq. 16): per-class sums and counts of its present f_t and f_i."""
    model.check_fits(data.text_dim, data.image_dim, data.labels)
    cfg = model.config
    c = cfg.num_classes
    ht, hi = data.has_text.float(), data.has_image.float()
    text_sum = torch.zeros(c, cfg.text_dim).index_add_(0, data.labels, data.text * ht[:, None])
    image_sum = torch.zeros(c, cfg.image_dim).index_add_(0, data.labels, data.image * hi[:, None])
    text_count = torch.zeros(c).index_add_(0, data.labels, ht)
    image_count = torch.zeros(c).index_add_(0, data.labels, hi)
    return ClassPrototypes(text_sum, image_sum, text_count, image_count)


def apply_global_prototypes(model: CrossModalNet, prototypes: ClassPrototypes) -> None:
    """Install global prototypes as VLMR entries (classes seen on both sides only)."""
    if prototypes.num_classes != model.config.num_classes:
        raise ModelInputError(
            f"prototypes have {prototypes.num_classes} classes, model has "
            f"{model.config.num_classes}"
        )
    text_mean, image_mean = prototypes.means()
    valid = (prototypes.text_count >= 1) & (prototypes.image_count >= 1)
    model.memory.set_prototypes(text_mean, image_mean, valid)
