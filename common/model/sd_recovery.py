"""Text->image recovery with Stable Diffusion (eq. 6-7, `stable-diffusion` mode).

As in the paper: generate a synthetic image from the caption with diffusers'
StableDiffusionPipeline built from a LOCAL checkpoint directory, encode it with E_i, and
fine-tune only the cross-attention (`attn2`) and text-projection parameters (everything else
-- VAE, text encoder body, UNet convolutions and self-attention -- stays frozen). Generated
features are cached (keyed by checkpoint + fine-tuned weights digest + sampler settings +
E_i identity + captions), so each caption is generated at most once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from crossfed.common.data.embedding_cache import EmbeddingCache, text_content_digest
from crossfed.common.model.encoders import ImageEncoder, weights_digest
from crossfed.common.model.mapper import squared_l2
from crossfed.common.model.model_errors import StableDiffusionSetupError
from torch import nn

TRAINABLE_MARKERS = ("attn2", "text_projection", "encoder_hid_proj")


def is_trainable_name(name: str) -> bool:
    """Cross-attention (attn2) and text-projection parameters are the only trainable ones."""
    parts = name.split(".")
    return any(marker in parts for marker in TRAINABLE_MARKERS)


class StableDiffusionRecovery:
    """Caption -> generated image -> E_i features, with attn2/text-projection fine-tuning."""

    def __init__(
        self,
        checkpoint_dir: str | Path,
        image_encoder: ImageEncoder,
        cache: EmbeddingCache | None = None,
        num_inference_steps: int = 25,
        image_size: int | None = None,
        guidance_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        from diffusers import DDPMScheduler, StableDiffusionPipeline

        self.checkpoint_dir = Path(checkpoint_dir)
        if not (self.checkpoint_dir / "model_index.json").is_file():
            raise StableDiffusionSetupError(
                f"{self.checkpoint_dir} is not a local diffusers checkpoint (no model_index.json)"
            )
        try:
            pipe_cls: Any = StableDiffusionPipeline
            self.pipe: Any = pipe_cls.from_pretrained(
                str(self.checkpoint_dir),
                local_files_only=True,
                safety_checker=None,
                requires_safety_checker=False,
            )
        except (OSError, ValueError) as exc:
            raise StableDiffusionSetupError(
                f"cannot load Stable Diffusion from {self.checkpoint_dir}: {exc}"
            ) from exc
        self.pipe.set_progress_bar_config(disable=True)
        self.train_scheduler: Any = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.image_encoder, self.cache = image_encoder, cache
        self.steps, self.guidance, self.seed = num_inference_steps, guidance_scale, seed
        factor = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        self.image_size = image_size or int(self.pipe.unet.config.sample_size) * factor
        self._base_digest = weights_digest(self.checkpoint_dir)
        for module in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder):
            for name, param in module.named_parameters():
                param.requires_grad_(module is not self.pipe.vae and is_trainable_name(name))
        if not self.trainable_parameters():
            raise StableDiffusionSetupError("checkpoint has no attn2 / text-projection parameters")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [
            p
            for m in (self.pipe.unet, self.pipe.text_encoder)
            for p in m.parameters()
            if p.requires_grad
        ]

    def _trainable_digest(self) -> str:
        h = hashlib.sha256()
        for p in self.trainable_parameters():
            h.update(p.detach().float().numpy().tobytes())
        return h.hexdigest()[:24]

    @property
    def identity(self) -> str:
        """Cache key part: base weights + current fine-tuned weights + sampler + E_i."""
        return (
            f"sd:{self._base_digest[:24]}:{self._trainable_digest()}:steps{self.steps}:"
            f"g{self.guidance}:seed{self.seed}:size{self.image_size}:"
            f"{self.image_encoder.identity}"
        )

    def _text_states(self, captions: Sequence[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.pipe.tokenizer.model_max_length,
            return_tensors="pt",
        )
        return self.pipe.text_encoder(tok.input_ids)[0]

    def finetune(
        self,
        images: np.ndarray,
        captions: Sequence[str],
        epochs: int = 1,
        lr: float = 1e-4,
        batch_size: int = 8,
        seed: int = 0,
    ) -> list[float]:
        """Latent-diffusion denoising loss on paired (image, caption); returns batch losses."""
        if len(images) != len(captions) or len(images) == 0:
            raise StableDiffusionSetupError("finetune needs equally many (>0) images and captions")
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=lr)
        vae, unet = self.pipe.vae, self.pipe.unet
        scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
        losses: list[float] = []
        unet.train()
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=gen)
            for start in range(0, len(images), batch_size):
                idx = order[start : start + batch_size].numpy()
                x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
                x = nn.functional.interpolate(
                    x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
                )
                with torch.no_grad():
                    latents = vae.encode(x).latent_dist.sample(generator=gen) * scaling
                noise = torch.randn(latents.shape, generator=gen)
                t = torch.randint(
                    0, self.train_scheduler.config.num_train_timesteps, (len(idx),), generator=gen
                )
                noisy = self.train_scheduler.add_noise(latents, noise, t)
                states = self._text_states([captions[i] for i in idx])
                pred = unet(noisy, t, encoder_hidden_states=states).sample
                loss = nn.functional.mse_loss(pred, noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        unet.eval()
        return losses

    @torch.no_grad()
    def generate(self, captions: Sequence[str]) -> np.ndarray:
        """D_stable(x_t) of eq. 6: uint8 images [N, H, W, 3]."""
        out = self.pipe(
            prompt=list(captions),
            num_inference_steps=self.steps,
            height=self.image_size,
            width=self.image_size,
            guidance_scale=self.guidance,
            output_type="np",
            generator=torch.Generator().manual_seed(self.seed),
        )
        return (np.clip(out.images, 0, 1) * 255 + 0.5).astype(np.uint8)

    def recover_features(self, captions: Sequence[str]) -> torch.Tensor:
        """f^_i = E_i(D_stable(x_t)) (eq. 6), cached by identity and caption content."""

        def compute() -> torch.Tensor:
            return self.image_encoder.encode(self.generate(captions))

        if self.cache is None:
            return compute()
        return self.cache.get_or_compute(self.identity, text_content_digest(captions), compute)

    def diff_loss(self, captions: Sequence[str], f_i: torch.Tensor) -> float:
        """L_diff (eq. 7) = ||f^_i - f_i||^2 of generated vs. real image features."""
        return float(squared_l2(self.recover_features(captions), f_i))
