"""Text->image recovery with Stable Diffusion (eq. 6-7, `stable-diffusion` mode).

As in the paper: generate a synthetic image from the caption with diffusers'
StableDiffusionPipeline built from a LOCAL checkpoint directory, encode it with E_i, and
fine-tune only the cross-attention (`attn2`) and text-projection parameters (sd_trainable.py);
the VAE, the text encoder and the rest of the UNet stay frozen. Generated features are cached
in the embedding cache, keyed by base checkpoint + fine-tuned weights digest + sampler settings
+ precision + E_i identity, and the set of (unique) captions, so a caption set is generated at
most once per weight state.

Departure from the paper: eq. 7 asks that generated features match real ones; back-propagating
||E_i(D_stable(x_t)) - f_i||^2 through a whole sampling chain is not affordable, so the
trainable layers fine-tune with Stable Diffusion's own denoising loss on the client's real
(image, caption) pairs, and L_diff of eq. 7 is measured on those pairs as the round's metric.
On CUDA, generation and fine-tuning run under bfloat16 autocast (fp16 where bf16 is missing);
the trainable weights and their deltas stay float32.
Imports torch, numpy and diffusers only (no pydantic, no gRPC), so benchmarks/
sd_recovery_gpu.py runs it on a bare GPU machine.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from crossfed.common.data.embedding_cache import EmbeddingCache, text_content_digest
from crossfed.common.data.encoder_interface import ImageEncoder
from crossfed.common.model.mapper import squared_l2
from crossfed.common.model.model_errors import StableDiffusionSetupError
from crossfed.common.model.sd_trainable import (
    TrainableSpec,
    checkpoint_digest,
    is_trainable_name,
    trainable_spec_of,
)
from torch import nn


@dataclass(frozen=True)
class SDRecoverySettings:
    """How images are sampled (part of the cache key) and how a round fine-tunes."""

    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    image_size: int | None = None  # pixels; None: the checkpoint's native size
    sample_seed: int = 0
    generation_batch_size: int = 8
    finetune_steps: int = 10  # optimiser steps per round on the client's paired rows
    finetune_batch_size: int = 8
    finetune_lr: float = 1e-5
    regenerate_every: int = 1  # rounds between regenerations of the recovered features


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' as a torch.device; CUDA must be there when asked for."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StableDiffusionSetupError(f"device {device!r} asked for, but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise StableDiffusionSetupError(f"device {device!r} is neither cpu nor cuda")
    return dev


class StableDiffusionRecovery:
    """Caption -> generated image -> E_i features, with attn2/text-projection fine-tuning.

    `load_deltas` / `deltas` move between the frozen base weights and the federated state
    (theta = theta_base + delta, see sd_trainable.py).
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        image_encoder: ImageEncoder,
        cache: EmbeddingCache | None = None,
        settings: SDRecoverySettings | None = None,
        device: str = "cpu",
        gradient_checkpointing: bool = False,
    ) -> None:
        from diffusers import DDPMScheduler, StableDiffusionPipeline

        self.checkpoint_dir = Path(checkpoint_dir)
        self.base_digest = checkpoint_digest(self.checkpoint_dir)  # also checks model_index
        self.device = resolve_device(device)
        try:
            pipe_cls: Any = StableDiffusionPipeline
            self.pipe: Any = pipe_cls.from_pretrained(
                str(self.checkpoint_dir),
                local_files_only=True,
                safety_checker=None,
                requires_safety_checker=False,
            )
        except (OSError, ValueError, TypeError) as exc:
            raise StableDiffusionSetupError(
                f"cannot load Stable Diffusion from {self.checkpoint_dir}: {exc}"
            ) from exc
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to(self.device)
        self.train_scheduler: Any = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.image_encoder, self.cache = image_encoder, cache
        self.settings = settings or SDRecoverySettings()
        self.unet: Any = self.pipe.unet
        for module in (self.unet, self.pipe.vae, self.pipe.text_encoder):
            for name, param in module.named_parameters():
                param.requires_grad_(module is self.unet and is_trainable_name(name))
        self._trainable = {n: p for n, p in self.unet.named_parameters() if p.requires_grad}
        if not self._trainable:
            raise StableDiffusionSetupError(
                f"{self.checkpoint_dir}: the UNet has no attn2 / text-projection parameters"
            )
        self._base = {n: p.detach().clone() for n, p in self._trainable.items()}
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self._amp_dtype: torch.dtype | None = None
        if self.device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
            self._amp_dtype = torch.bfloat16 if bf16 else torch.float16
        self._weights_digest: str | None = None
        self.last_identity: str | None = None  # cache identity of the last generation
        self.generated_images = 0  # images generated by this object (cache misses)

    # -- federated state -------------------------------------------------------------------
    @property
    def spec(self) -> TrainableSpec:
        """Names and shapes of the trainable UNet tensors of this checkpoint."""
        return trainable_spec_of(self._trainable.items())

    @property
    def native_image_size(self) -> int:
        factor = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        return int(self.unet.config.sample_size) * factor

    @property
    def image_size(self) -> int:
        return self.settings.image_size or self.native_image_size

    @torch.no_grad()
    def load_deltas(self, deltas: Mapping[str, torch.Tensor]) -> None:
        """theta = theta_base + delta for every trainable tensor (a missing key is an error)."""
        missing = sorted(set(self._trainable) - set(deltas))
        if missing:
            raise StableDiffusionSetupError(f"no delta for trainable tensor {missing[0]}")
        for name, param in self._trainable.items():
            delta = deltas[name].to(self.device, param.dtype)
            param.copy_(self._base[name] + delta)
        self._weights_digest = None

    @torch.no_grad()
    def deltas(self) -> dict[str, torch.Tensor]:
        """theta - theta_base per trainable tensor, float32 on the CPU (what is uploaded)."""
        return {
            name: (param - self._base[name]).float().cpu().contiguous()
            for name, param in self._trainable.items()
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self._trainable.values())

    def _trainable_digest(self) -> str:
        if self._weights_digest is None:
            h = hashlib.sha256()
            for name, param in self._trainable.items():
                h.update(name.encode())
                h.update(param.detach().float().cpu().numpy().tobytes())
            self._weights_digest = h.hexdigest()[:24]
        return self._weights_digest

    @property
    def precision(self) -> str:
        """fp32 on the CPU; the autocast dtype (bfloat16 / float16) on CUDA."""
        return "fp32" if self._amp_dtype is None else str(self._amp_dtype).split(".")[-1]

    @property
    def identity(self) -> str:
        """Cache key part: base + current fine-tuned weights + sampler + precision + E_i."""
        s = self.settings
        return (
            f"sd:{self.base_digest[:24]}:{self._trainable_digest()}:steps{s.num_inference_steps}"
            f":g{s.guidance_scale}:seed{s.sample_seed}:size{self.image_size}:{self.precision}"
            f":{self.image_encoder.identity}"
        )

    # -- generation (eq. 6) ----------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self._amp_dtype)

    @torch.no_grad()
    def generate(self, captions: Sequence[str]) -> np.ndarray:
        """D_stable(x_t) of eq. 6: uint8 images [N, H, W, 3]. Each caption's initial noise is
        drawn from its own CPU generator seeded with `sample_seed`, so an image depends on its
        caption and the weights, not on the batch it was generated in."""
        s = self.settings
        out: list[np.ndarray] = []
        for start in range(0, len(captions), s.generation_batch_size):
            batch = list(captions[start : start + s.generation_batch_size])
            gens = [torch.Generator().manual_seed(s.sample_seed) for _ in batch]
            with self._autocast():
                result = self.pipe(
                    prompt=batch,
                    num_inference_steps=s.num_inference_steps,
                    height=self.image_size,
                    width=self.image_size,
                    guidance_scale=s.guidance_scale,
                    output_type="np",
                    generator=gens,
                )
            images = np.asarray(result.images, dtype=np.float32)
            out.append((np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8))
        self.generated_images += len(captions)
        if not out:
            size = self.image_size
            return np.zeros((0, size, size, 3), dtype=np.uint8)
        return np.concatenate(out)

    def recover_features(self, captions: Sequence[str], reuse_last: bool = False) -> torch.Tensor:
        """f^_i = E_i(D_stable(x_t)) (eq. 6) per caption; each distinct caption is generated
        once. Cached by identity and the set of distinct captions. With `reuse_last`, the
        features of the last generation (older weights) are served from the cache when there,
        else they are generated with the current weights."""
        if not captions:
            return torch.zeros(0, self.image_encoder.dim)
        unique, inverse = np.unique(np.asarray(list(captions), dtype=object), return_inverse=True)
        distinct = [str(c) for c in unique]
        content = text_content_digest(distinct)
        rows = torch.from_numpy(inverse.reshape(-1).astype(np.int64))
        if reuse_last and self.cache is not None and self.last_identity is not None:
            cached = self.cache.get(self.last_identity, content)
            if cached is not None:
                return cached[rows]

        def compute() -> torch.Tensor:
            return self.image_encoder.encode(self.generate(distinct))

        identity = self.identity
        self.last_identity = identity
        feats = (
            compute()
            if self.cache is None
            else self.cache.get_or_compute(identity, content, compute)
        )
        return feats[rows]

    def diff_loss(self, generated: torch.Tensor, f_i: torch.Tensor) -> float:
        """L_diff (eq. 7) = ||f^_i - f_i||^2 of generated vs. real image features."""
        return float(squared_l2(generated, f_i))

    # -- fine-tuning (eq. 7, see the module docstring) ------------------------------------
    def _text_states(self, captions: Sequence[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.pipe.tokenizer.model_max_length,
            return_tensors="pt",
        )
        with torch.no_grad():  # the text encoder is frozen
            return self.pipe.text_encoder(tok.input_ids.to(self.device))[0]

    def _batches(
        self, n: int, steps: int, batch_size: int, gen: torch.Generator
    ) -> Iterator[np.ndarray]:
        """`steps` batches of row indices: passes over fresh permutations, wrapping around."""
        order = torch.randperm(n, generator=gen)
        pos = 0
        for _ in range(steps):
            take: list[int] = []
            while len(take) < min(batch_size, n):
                if pos == n:
                    order, pos = torch.randperm(n, generator=gen), 0
                take.append(int(order[pos]))
                pos += 1
            yield np.asarray(take)

    def finetune(
        self, images: np.ndarray, captions: Sequence[str], steps: int | None = None, seed: int = 0
    ) -> list[float]:
        """`steps` AdamW steps of the latent-diffusion loss on paired (image, caption), batch
        `finetune_batch_size`; only attn2 / text projection move. Returns the step losses."""
        s = self.settings
        steps = s.finetune_steps if steps is None else steps
        if len(images) != len(captions) or len(images) == 0:
            raise StableDiffusionSetupError("finetune needs equally many (>0) images and captions")
        gen = torch.Generator().manual_seed(seed)
        params = self.trainable_parameters()
        opt = torch.optim.AdamW(params, lr=s.finetune_lr, weight_decay=0.0)
        vae, unet = self.pipe.vae, self.unet
        scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
        prediction = getattr(self.train_scheduler.config, "prediction_type", "epsilon")
        size = self.image_size
        losses: list[float] = []
        unet.train()
        try:
            for idx in self._batches(len(images), steps, s.finetune_batch_size, gen):
                x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
                x = nn.functional.interpolate(
                    x, size=(size, size), mode="bilinear", align_corners=False
                ).to(self.device)
                with torch.no_grad(), self._autocast():
                    dist = vae.encode(x).latent_dist
                    latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(
                        self.device, dist.mean.dtype
                    )
                latents = latents.float() * scaling
                noise = torch.randn(latents.shape, generator=gen).to(self.device)
                t = torch.randint(
                    0, self.train_scheduler.config.num_train_timesteps, (len(idx),), generator=gen
                ).to(self.device)
                noisy = self.train_scheduler.add_noise(latents, noise, t)
                target = (
                    self.train_scheduler.get_velocity(latents, noise, t)
                    if prediction == "v_prediction"
                    else noise
                )
                states = self._text_states([captions[i] for i in idx.tolist()])
                with self._autocast():
                    pred = unet(noisy, t, encoder_hidden_states=states).sample
                loss = nn.functional.mse_loss(pred.float(), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        finally:
            unet.eval()
            opt.zero_grad(set_to_none=True)
            self._weights_digest = None
        return losses
