"""Image feature disentanglement D_i (eq. 2) and its orthogonality loss L_orth (eq. 3)."""

from __future__ import annotations

import torch
from torch import nn


class Disentangler(nn.Module):
    """D_i(f_i) = (f_i->t, f_i->v) with f_i->t = g(f_i) and f_i->v = f_i - f_i->t.

    Defining the visual part as the residual makes f_i = f_i->t + f_i->v hold by construction
    (eq. 2), for any g.
    """

    def __init__(self, image_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.text_part = nn.Sequential(
            nn.Linear(image_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, image_dim)
        )

    def forward(self, f_i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f_it = self.text_part(f_i)
        return f_it, f_i - f_it


def orthogonality_per_row(f_it: torch.Tensor, f_iv: torch.Tensor) -> torch.Tensor:
    """Eq. 3 for each sample: |f_i->t^T f_i->v|, divided by sqrt of the feature width so
    lambda_1 does not depend on d'."""
    return (f_it * f_iv).sum(dim=1).abs() / f_it.shape[1] ** 0.5


def orthogonality_loss(f_it: torch.Tensor, f_iv: torch.Tensor) -> torch.Tensor:
    """L_orth (eq. 3): `orthogonality_per_row` averaged over the batch (0 for no rows)."""
    if f_it.shape[0] == 0:
        return f_it.new_zeros(())
    return orthogonality_per_row(f_it, f_iv).mean()
