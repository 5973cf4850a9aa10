"""Stable Diffusion recovery (eq. 6-7) on a tiny random local checkpoint: 2 steps, 32x32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from crossfed.common.data.embedding_cache import EmbeddingCache
from crossfed.common.model.encoders import SmallCNNImageEncoder
from crossfed.common.model.model_errors import StableDiffusionSetupError
from crossfed.common.model.sd_recovery import StableDiffusionRecovery, is_trainable_name
from tiny_hf_models import save_tiny_stable_diffusion


def test_only_cross_attention_and_text_projection_train(tmp_path: Path) -> None:
    ckpt = save_tiny_stable_diffusion(tmp_path / "sd")
    cache = EmbeddingCache(tmp_path / "cache")
    rec = StableDiffusionRecovery(ckpt, SmallCNNImageEncoder(), cache, num_inference_steps=2)
    pipe = rec.pipe
    trainable = [
        n
        for m in (pipe.unet, pipe.text_encoder, pipe.vae)
        for n, p in m.named_parameters()
        if p.requires_grad
    ]
    assert trainable and all("attn2" in n or "text_projection" in n for n in trainable)
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    assert any(".attn1." in n for n, _ in pipe.unet.named_parameters())  # self-attn frozen
    assert is_trainable_name("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")
    assert not is_trainable_name("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k")

    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    captions = ["a red circle", "a blue square", "a green cross", "a red triangle"]
    frozen = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    losses = rec.finetune(images, captions, epochs=1, batch_size=2)
    assert len(losses) == 2 and all(np.isfinite(losses))
    changed = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, frozen[n])}
    assert changed and all("attn2" in n for n in changed)

    feats = rec.recover_features(captions[:2])
    assert feats.shape == (2, 256) and torch.isfinite(feats).all()
    misses = cache.stats.misses
    assert torch.equal(rec.recover_features(captions[:2]), feats)  # cached, not regenerated
    assert cache.stats.misses == misses and cache.stats.hits == 1
    assert rec.diff_loss(captions[:2], feats) == 0.0


def test_rejects_non_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(StableDiffusionSetupError, match="model_index.json"):
        StableDiffusionRecovery(tmp_path, SmallCNNImageEncoder())
