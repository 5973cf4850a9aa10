"""What the data layer encodes with: a frozen text encoder E_t and image encoder E_i (eq. 1).
The implementations (MiniLM, CLIP, the small CNN) live in common/model/encoders.py; the
embedding cache and the recovery code depend only on this contract."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch


class TextEncoder(ABC):
    """E_t: captions -> [N, dim] float32."""

    dim: int
    identity: str

    @abstractmethod
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed captions (no grad, frozen)."""


class ImageEncoder(ABC):
    """E_i: uint8 images [N, H, W, 3] -> [N, dim] float32."""

    dim: int
    identity: str

    @abstractmethod
    def encode(self, images: np.ndarray) -> torch.Tensor:
        """Embed images (no grad, frozen)."""
