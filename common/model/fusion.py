"""Fusion MLP over [f_t, f^_t, f_i, f^_i] (eq. 12) and classification head H (eq. 13)."""

from __future__ import annotations

import torch
from torch import nn


def fusion_slots(
    f_t: torch.Tensor,
    f_i: torch.Tensor,
    has_text: torch.Tensor,
    has_image: torch.Tensor,
    rec_t: torch.Tensor | None,
    rec_i: torch.Tensor | None,
) -> torch.Tensor:
    """Build [f_t, f^_t, f_i, f^_i] per Table I.

    Observed slots hold the real feature or 0 when absent (so the MLP knows what was
    observed); recovered slots hold the real feature when present, else the recovery
    (mapper output for text, diffusion/VLMR output for image). With rec_* None (the
    zero-fill baseline) recovered slots of absent modalities are 0.
    """
    mt = has_text.unsqueeze(1).to(f_t.dtype)
    mi = has_image.unsqueeze(1).to(f_i.dtype)
    obs_t, obs_i = f_t * mt, f_i * mi
    hat_t = obs_t if rec_t is None else obs_t + (1 - mt) * rec_t
    hat_i = obs_i if rec_i is None else obs_i + (1 - mi) * rec_i
    return torch.cat([obs_t, hat_t, obs_i, hat_i], dim=1)


class FusionMLP(nn.Module):
    """f_final = MLP([f_t, f^_t, f_i, f^_i]) (eq. 12)."""

    def __init__(self, text_dim: int, image_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * text_dim + 2 * image_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.SiLU(),
        )

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        return self.net(slots)
