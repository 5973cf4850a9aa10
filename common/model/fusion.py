"""Fusion MLP over [f_t, f^_t, f_i, f^_i] (eq. 12) and classification head H (eq. 13)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks

# Rows from which forward_views' summed-weight path is faster than the 4-slot input (one
# thread, fusion 1280 -> 256: equal at 64 rows, 6% faster at 128, 28% at 1024).
SHARED_SLOT_MIN_ROWS = 96


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

    def forward_views(
        self,
        f_t: torch.Tensor,
        f_i: torch.Tensor,
        has_text: torch.Tensor,
        has_image: torch.Tensor,
        rec_t: torch.Tensor | None,
        rec_i: torch.Tensor | None,
    ) -> torch.Tensor:
        """Same as forward(fusion_slots(...)) (eq. 12) with fewer multiply-adds.

        A present modality fills both its observed and recovered slot, so its two weight
        blocks act as their sum on one copy; recovered inputs only multiply the rows that miss
        the modality. Falls back to the plain path for small batches (summing the weight
        blocks costs more than it saves) and when the first layer carries hooks (Opacus'
        per-sample gradients need the layer called on the 4-slot input).
        """
        first = self.net[0]
        assert isinstance(first, nn.Linear)
        if f_t.shape[0] < SHARED_SLOT_MIN_ROWS or _has_hooks(first):
            return self.net(fusion_slots(f_t, f_i, has_text, has_image, rec_t, rec_i))
        miss_t = (~has_text).nonzero().squeeze(1) if rec_t is not None else None
        miss_i = (~has_image).nonzero().squeeze(1) if rec_i is not None else None
        hidden = _SharedSlotLinear.apply(
            f_t * has_text.unsqueeze(1).to(f_t.dtype),
            f_i * has_image.unsqueeze(1).to(f_i.dtype),
            None if rec_t is None or miss_t is None else rec_t[miss_t],
            miss_t,
            None if rec_i is None or miss_i is None else rec_i[miss_i],
            miss_i,
            first.weight,
            first.bias,
        )
        return self.net[1:](hidden)


def _has_hooks(layer: nn.Module) -> bool:
    """Whether anything observes `layer`'s calls (its own or global module hooks)."""
    return bool(
        layer._forward_hooks
        or layer._forward_pre_hooks
        or layer._backward_hooks
        or layer._backward_pre_hooks
        or _module_hooks._global_forward_hooks
        or _module_hooks._global_forward_pre_hooks
        or _module_hooks._global_backward_hooks
        or _module_hooks._global_backward_pre_hooks
    )


class _SharedSlotLinear(torch.autograd.Function):
    """Linear over [o_t, h_t, o_i, h_i] from the observed parts and the recovered rows only:
    W [o_t, h_t, o_i, h_i] = (W_ot + W_ht) o_t + (W_oi + W_hi) o_i + W_ht r_t + W_hi r_i,
    where r_* are the rows missing that modality (eq. 12's first layer)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        obs_t: torch.Tensor,
        obs_i: torch.Tensor,
        rec_t: torch.Tensor | None,
        idx_t: torch.Tensor | None,
        rec_i: torch.Tensor | None,
        idx_i: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        d_t, d_i = obs_t.shape[1], obs_i.shape[1]
        w_ht, w_hi = weight[:, d_t : 2 * d_t], weight[:, 2 * d_t + d_i :]
        w_t = weight[:, :d_t] + w_ht
        w_i = weight[:, 2 * d_t : 2 * d_t + d_i] + w_hi
        out = obs_t @ w_t.t() if bias is None else torch.addmm(bias, obs_t, w_t.t())
        out.addmm_(obs_i, w_i.t())
        if rec_t is not None and idx_t is not None and rec_t.shape[0]:
            out.index_add_(0, idx_t, rec_t @ w_ht.t())
        if rec_i is not None and idx_i is not None and rec_i.shape[0]:
            out.index_add_(0, idx_i, rec_i @ w_hi.t())
        ctx.save_for_backward(obs_t, obs_i, rec_t, idx_t, rec_i, idx_i, weight, w_t, w_i)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        obs_t, obs_i, rec_t, idx_t, rec_i, idx_i, weight, w_t, w_i = ctx.saved_tensors
        d_t, d_i = obs_t.shape[1], obs_i.shape[1]
        need = ctx.needs_input_grad
        g_t = grad[idx_t] if rec_t is not None and idx_t is not None and rec_t.shape[0] else None
        g_i = grad[idx_i] if rec_i is not None and idx_i is not None and rec_i.shape[0] else None
        g_obs_t = grad @ w_t if need[0] else None
        g_obs_i = grad @ w_i if need[1] else None
        g_rt = g_t @ weight[:, d_t : 2 * d_t] if need[2] and g_t is not None else None
        g_ri = g_i @ weight[:, 2 * d_t + d_i :] if need[4] and g_i is not None else None
        g_w = None
        if need[6]:
            a_t, a_i = grad.t() @ obs_t, grad.t() @ obs_i
            g_w = torch.cat([a_t, a_t, a_i, a_i], dim=1)
            if g_t is not None:
                g_w[:, d_t : 2 * d_t].addmm_(g_t.t(), rec_t)
            if g_i is not None:
                g_w[:, 2 * d_t + d_i :].addmm_(g_i.t(), rec_i)
        g_b = grad.sum(0) if ctx.has_bias and need[7] else None
        return g_obs_t, g_obs_i, g_rt, None, g_ri, None, g_w, g_b
