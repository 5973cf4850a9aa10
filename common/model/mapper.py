"""Cross-modal mapper M_it (eq. 4) and alignment loss L_align (eq. 5)."""

from __future__ import annotations

import torch
from torch import nn


class CrossModalMapper(nn.Module):
    """f^_t = M_it(f_i->t): estimates the missing text embedding from an image's text part."""

    def __init__(self, image_dim: int, text_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(image_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, text_dim),
        )

    def forward(self, f_it: torch.Tensor) -> torch.Tensor:
        return self.net(f_it)


def squared_l2_per_row(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||pred - target||_2^2 for each sample (eq. 5, 7 and 11 before averaging)."""
    return (pred - target).pow(2).sum(dim=1)


def squared_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`squared_l2_per_row` averaged over the batch (0 for no rows)."""
    if pred.shape[0] == 0:
        return pred.new_zeros(())
    return squared_l2_per_row(pred, target).mean()
