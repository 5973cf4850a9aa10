"""RawDataset: images + captions + labels before encoding (input of the encoders, eq. 1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from crossfed.common.data.data_errors import DataError


@dataclass
class RawDataset:
    """Images as one uint8 array [N, H, W, 3] (zeros where absent), captions ("" where absent)."""

    images: np.ndarray
    texts: list[str]
    labels: np.ndarray  # int64 [N]
    has_text: np.ndarray  # bool [N]
    has_image: np.ndarray  # bool [N]
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.images.ndim != 4 or self.images.shape[0] != n or self.images.shape[3] != 3:
            raise DataError(f"images must be [N, H, W, 3] with N={n}, got {self.images.shape}")
        if self.images.dtype != np.uint8:
            raise DataError(f"images must be uint8, got {self.images.dtype}")
        if len(self.texts) != n or len(self.has_text) != n or len(self.has_image) != n:
            raise DataError("texts, has_text and has_image must have one entry per label")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else int(self.labels.max()) + 1

    def subset(self, indices: Sequence[int] | np.ndarray) -> RawDataset:
        """Rows at `indices` (copies)."""
        idx = np.asarray(indices, dtype=np.int64)
        return RawDataset(
            images=self.images[idx].copy(),
            texts=[self.texts[i] for i in idx.tolist()],
            labels=self.labels[idx].copy(),
            has_text=self.has_text[idx].copy(),
            has_image=self.has_image[idx].copy(),
            class_names=list(self.class_names),
        )
