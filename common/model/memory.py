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
        # All classes at once: a row's rank among the kept rows of its class fixes its slot
        # (the newest `capacity` rows per class survive, written from the class's cursor on).
        onehot = nn.functional.one_hot(labels, self.num_classes)
        per_class = onehot.sum(dim=0)
        rank = onehot.cumsum(dim=0).gather(1, labels[:, None]).squeeze(1) - 1
        j = rank - (per_class - self.capacity).clamp(min=0)[labels]
        if not bool((j >= 0).all()):
            survive = j >= 0
            f_t, f_i, labels, j = f_t[survive], f_i[survive], labels[survive], j[survive]
        slots = (self.cursor[labels] + j) % self.capacity
        self.text[labels, slots] = f_t
        self.image[labels, slots] = f_i
        stored = per_class.clamp(max=self.capacity)
        self.cursor.copy_((self.cursor + stored) % self.capacity)
        self.count.copy_((self.count + stored).clamp(max=self.capacity))
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
        n, dim = f_t.shape[0], self.image.shape[2]
        if n == 0:
            return torch.zeros(0, dim, dtype=self.image.dtype)
        # Queries grouped by class into a padded [G, rows, d] block, so one batched matmul
        # scores every query against its own class's entries only. G is every class (no copy
        # of the memory) unless padding would waste over 4x the queries' own work.
        sizes = torch.bincount(classes, minlength=self.num_classes)
        rows = int(sizes.max())
        if self.num_classes * rows <= 4 * n:
            cls, group_of, texts = torch.arange(self.num_classes), classes, self.text
        else:
            cls = sizes.nonzero().squeeze(1)
            group_of = (sizes > 0).cumsum(0)[classes] - 1
            sizes, texts = sizes[cls], self.text[cls]
        order = group_of.argsort(stable=True)
        row_group = group_of[order]
        pos = torch.arange(n) - (sizes.cumsum(0) - sizes)[row_group]
        block = f_t.new_zeros(len(cls), rows, f_t.shape[1])
        block[row_group, pos] = nn.functional.normalize(f_t[order], dim=1)
        # Cosine similarity to the capacity slots, then to the prototype slot (index capacity).
        norms = torch.linalg.vector_norm(texts, dim=2).clamp_min(1e-12)
        sims = (block @ texts.transpose(1, 2)) / norms[:, None, :]
        protos = nn.functional.normalize(self.proto_text[cls], dim=1)
        sims = torch.cat([sims, block @ protos[:, :, None]], dim=2)
        valid = torch.cat(
            [torch.arange(self.capacity) < self.count[cls, None], self.proto_valid[cls, None]],
            dim=1,
        )
        # Back to one row per query (padding dropped); average only real entries (fewer than
        # K: what exists; none: 0).
        sims = sims[row_group, pos].masked_fill_(~valid[row_group], float("-inf"))
        top_sims, top = sims.topk(min(self.top_k, self.capacity + 1), dim=1)
        weight = torch.isfinite(top_sims)
        query_cls = cls[row_group]
        is_proto = top == self.capacity
        weight = weight.to(self.image.dtype)
        slot_weight = weight.masked_fill(is_proto, 0.0)
        flat = query_cls[:, None] * self.capacity + top.masked_fill(is_proto, 0)
        total = nn.functional.embedding_bag(
            flat, self.image.reshape(-1, dim), per_sample_weights=slot_weight, mode="sum"
        )
        proto_weight = (weight * is_proto).sum(dim=1, keepdim=True)
        total = total + proto_weight * self.proto_image[query_cls]
        out = torch.empty(n, dim, dtype=total.dtype)
        out[order] = total / weight.sum(dim=1, keepdim=True).clamp(min=1.0)
        return out
