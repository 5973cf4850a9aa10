"""Text->image recovery in feature space (eq. 6-7, `feature` mode).

A conditional denoising diffusion model over image embeddings f_i, conditioned on f_t, built
on diffusers' schedulers: DDPMScheduler for training, DDIMScheduler for fast sampling. The
denoiser predicts the clean feature (prediction_type="sample"), so its training loss is the
paper's L_diff = ||f^_i - f_i||^2 (eq. 7) on the one-step estimate f^_i. The paper's
image-generate-then-encode path (D_stable then E_i) is replaced by generating E_i's output
directly: same recovered quantity, ~10^4 x cheaper (see the design card).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from crossfed.common.model.mapper import squared_l2_per_row
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn


class FeatureDenoiser(nn.Module):
    """x0-predicting MLP: (noisy f_i, timestep, f_t) -> estimate of clean f_i."""

    def __init__(self, image_dim: int, text_dim: int, hidden_dim: int, num_timesteps: int) -> None:
        super().__init__()
        self.time_embed = nn.Embedding(num_timesteps, hidden_dim)
        self.cond = nn.Sequential(nn.Linear(text_dim, hidden_dim), nn.SiLU())
        self.inp = nn.Linear(image_dim, hidden_dim)
        self.block = nn.Sequential(
            nn.LayerNorm(hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, image_dim))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        h = self.inp(x_t) + self.time_embed(t) + self.cond(f_t)
        return self.out(h + self.block(h))


class FeatureDiffusion(nn.Module):
    """Trains with DDPM noising, samples with DDIM; features are scaled to unit variance."""

    def __init__(
        self, image_dim: int, text_dim: int, hidden_dim: int, train_steps: int, sample_steps: int
    ) -> None:
        super().__init__()
        self.denoiser = FeatureDenoiser(image_dim, text_dim, hidden_dim, train_steps)
        self.train_steps, self.sample_steps = train_steps, sample_steps
        # Encoders here emit features with norm ~1, i.e. ~1/sqrt(d') per coordinate.
        self.scale = math.sqrt(image_dim)
        self.image_dim = image_dim
        ddpm_cls: Any = DDPMScheduler  # diffusers ships no usable type information
        self.ddpm: Any = ddpm_cls(
            num_train_timesteps=train_steps,
            beta_schedule="squaredcos_cap_v2",
            prediction_type="sample",
            clip_sample=False,
        )
        self.ddim: Any = DDIMScheduler.from_config(self.ddpm.config)

    def draw_loss_noise(
        self, rows: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The noise and timesteps `loss` draws for `rows` paired rows (None for none), so a
        caller can draw them first and run the denoiser later without changing the stream."""
        if rows == 0:
            return None
        noise = torch.randn((rows, self.image_dim), generator=generator, dtype=dtype)
        t = torch.randint(0, self.train_steps, (rows,), generator=generator)
        return noise, t

    def loss_per_row(
        self,
        f_i: torch.Tensor,
        f_t: torch.Tensor,
        generator: torch.Generator | None = None,
        drawn: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """L_diff (eq. 7) for each paired row: denoise a randomly noised f_i given f_t (noise
        and timesteps from `drawn` when given, else drawn here)."""
        if f_i.shape[0] == 0:
            return f_i.new_zeros((0,))
        x0 = f_i * self.scale
        if drawn is None:
            drawn = self.draw_loss_noise(x0.shape[0], generator, x0.dtype)
            assert drawn is not None
        noise, t = drawn
        x_t = self.ddpm.add_noise(x0, noise, t)
        pred = self.denoiser(x_t, t, f_t)
        return squared_l2_per_row(pred / self.scale, f_i)

    def loss(
        self,
        f_i: torch.Tensor,
        f_t: torch.Tensor,
        generator: torch.Generator | None = None,
        drawn: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """L_diff (eq. 7): `loss_per_row` averaged over the paired rows (0 for none)."""
        if f_i.shape[0] == 0:
            return f_i.new_zeros(())
        return self.loss_per_row(f_i, f_t, generator, drawn).mean()

    @torch.no_grad()
    def sample(
        self,
        f_t: torch.Tensor,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """f^_i for text-only rows (eq. 6): DDIM sampling from noise conditioned on f_t (drawn
        from ``generator``, or ``noise`` [n, image_dim] when given)."""
        n = f_t.shape[0]
        dim = self.image_dim
        if n == 0:
            return f_t.new_zeros((0, dim))
        self.ddim.set_timesteps(steps or self.sample_steps)
        if noise is not None:
            x = noise.to(f_t.dtype).clone()
        else:
            x = torch.randn((n, dim), generator=generator, dtype=f_t.dtype)
        for t in self.ddim.timesteps:
            tt = torch.full((n,), int(t), dtype=torch.long)
            pred = self.denoiser(x, tt, f_t)
            x = self.ddim.step(pred, int(t), x, eta=0.0).prev_sample
        return x / self.scale
