"""Visual-linguistic memory retrieval, VLMR (eq. 8-11).

Per class y a ring buffer M_y of (f_t, f_i) pairs admitted only when the classifier's
confidence exceeds tau (eq. 8). A text-only query first gets a class from Classifier(f_t)
(eq. 9), then the image features of its top-K most similar memory entries of that class are
averaged (eq. 10). Global class prototypes (eq. 16) can be added as extra entries, so a client
whose own memory holds no image features can still retrieve image-side knowledge.

The memory holds a client's own features: it is buffers, never part of what is shared.
"""

from __future__ import annotations

import torch
from torch import nn


class VisualLinguisticMemory(nn.Module):
    """Per-class ring buffers of (f_t, f_i) plus optional per-class prototype entries."""

    def __init__(
        self, num_classes: int, capacity: int, text_dim: int, image_dim: int, tau: float, top_k: int
    ) -> None:
        super().__init__()
        self.num_classes, self.capacity, self.tau, self.top_k = num_classes, capacity, tau, top_k
        self.register_buffer("text", torch.zeros(num_classes, capacity, text_dim))
        self.register_buffer("image", torch.zeros(num_classes, capacity, image_dim))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("cursor", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("proto_text", torch.zeros(num_classes, text_dim))
        self.register_buffer("proto_image", torch.zeros(num_classes, image_dim))
        self.register_buffer("proto_valid", torch.zeros(num_classes, dtype=torch.bool))

    text: torch.Tensor
    image: torch.Tensor
    count: torch.Tensor
    cursor: torch.Tensor
    proto_text: torch.Tensor
    proto_image: torch.Tensor
    proto_valid: torch.Tensor

    @torch.no_grad()
    def admit(
        self, f_t: torch.Tensor, f_i: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor
    ) -> int:
        """Eq. 8: store pairs whose confidence > tau (oldest overwritten); returns how many."""
        keep = confidence > self.tau
        if not bool(keep.any()):
            return 0
        f_t, f_i, labels = f_t[keep], f_i[keep], labels[keep]
        for cls in labels.unique().tolist():
            rows = (labels == cls).nonzero().squeeze(1)[-self.capacity :]
            slots = (self.cursor[cls] + torch.arange(len(rows))) % self.capacity
            self.text[cls, slots] = f_t[rows]
            self.image[cls, slots] = f_i[rows]
            self.cursor[cls] = (self.cursor[cls] + len(rows)) % self.capacity
            self.count[cls] = torch.clamp(self.count[cls] + len(rows), max=self.capacity)
        return int(keep.sum())

    @torch.no_grad()
    def set_prototypes(
        self, text_means: torch.Tensor, image_means: torch.Tensor, valid: torch.Tensor
    ) -> None:
        """Install global per-class (f_t, f_i) means as one extra entry per valid class."""
        self.proto_text.copy_(text_means)
        self.proto_image.copy_(image_means)
        self.proto_valid.copy_(valid)

    def has_entries(self, classes: torch.Tensor) -> torch.Tensor:
        """Whether retrieval for each queried class has anything to average."""
        return (self.count[classes] > 0) | self.proto_valid[classes]

    @torch.no_grad()
    def retrieve(self, f_t: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Eq. 10: mean f_i of the top-K entries of M_class most cosine-similar to f_t.

        Classes with fewer than K entries average what they have; classes with none give 0
        (check has_entries first).
        """
        out = torch.zeros(f_t.shape[0], self.image.shape[2], dtype=self.image.dtype)
        queries = nn.functional.normalize(f_t, dim=1)
        # One small matmul per queried class (capacity entries + its prototype) instead of
        # scoring every query against the whole memory.
        for cls in classes.unique().tolist():
            rows = (classes == cls).nonzero().squeeze(1)
            n = int(self.count[cls])
            keys, values = self.text[cls, :n], self.image[cls, :n]
            if bool(self.proto_valid[cls]):
                keys = torch.cat([keys, self.proto_text[cls : cls + 1]])
                values = torch.cat([values, self.proto_image[cls : cls + 1]])
            if keys.shape[0] == 0:
                continue
            sims = queries[rows] @ nn.functional.normalize(keys, dim=1).T
            top = sims.topk(min(self.top_k, keys.shape[0]), dim=1).indices
            out[rows] = values[top].mean(dim=1)
        return out
