"""Feature-space diffusion (eq. 6-7) on diffusers' DDPM (train) and DDIM (sample) schedulers."""

from __future__ import annotations

import torch
from crossfed.common.model.feature_diffusion import FeatureDiffusion
from diffusers import DDIMScheduler, DDPMScheduler


def test_learns_a_conditional_mapping() -> None:
    torch.manual_seed(0)
    text_dim, image_dim = 6, 4
    proj = torch.randn(text_dim, image_dim) / text_dim**0.5
    model = FeatureDiffusion(image_dim, text_dim, hidden_dim=32, train_steps=50, sample_steps=5)
    assert isinstance(model.ddpm, DDPMScheduler) and isinstance(model.ddim, DDIMScheduler)
    assert model.ddpm.config.num_train_timesteps == 50
    assert model.ddim.config.prediction_type == "sample"  # denoiser predicts clean f_i (eq. 7)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        f_t = torch.randn(n, text_dim, generator=gen)
        return (f_t @ proj) / image_dim**0.5, f_t  # f_i fully determined by f_t

    f_i, f_t = batch(256)
    first = float(model.loss(f_i, f_t, gen).detach())
    for _ in range(200):
        f_i, f_t = batch(128)
        loss = model.loss(f_i, f_t, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.3 * first
    f_i, f_t = batch(200)
    sample = model.sample(f_t, generator=torch.Generator().manual_seed(1))
    err = (sample - f_i).pow(2).sum(1).mean()
    base = (f_i - f_i.mean(0)).pow(2).sum(1).mean()
    assert float(err) < 0.25 * float(base)  # far better than predicting the mean
    again = model.sample(f_t, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample, again)  # deterministic given the generator
    assert model.sample(f_t[:0]).shape == (0, image_dim)
