"""Stable Diffusion recovery (eq. 6-7) on a tiny random checkpoint built here (no download):
exactly attn2 + text projection train, deltas round-trip, the generated-feature cache is keyed
by the fine-tuned weights, and the checkpoint digest / trainable spec need no weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from crossfed.common.data.embedding_cache import EmbeddingCache
from crossfed.common.model.encoders import SmallCNNImageEncoder
from crossfed.common.model.model_errors import StableDiffusionSetupError
from crossfed.common.model.sd_random_checkpoint import save_random_stable_diffusion
from crossfed.common.model.sd_recovery import SDRecoverySettings, StableDiffusionRecovery
from crossfed.common.model.sd_trainable import (
    checkpoint_digest,
    is_trainable_name,
    trainable_spec_of_checkpoint,
)

SETTINGS = SDRecoverySettings(
    num_inference_steps=2, guidance_scale=1.0, finetune_steps=2, finetune_batch_size=2
)
CAPTIONS = ["a red circle", "a blue square", "a green cross", "a red triangle"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny")


@pytest.fixture()
def recovery(checkpoint: Path, tmp_path: Path) -> StableDiffusionRecovery:
    cache = EmbeddingCache(tmp_path / "cache")
    return StableDiffusionRecovery(checkpoint, SmallCNNImageEncoder.pretrained(), cache, SETTINGS)


def test_trainable_set_is_exactly_cross_attention_and_text_projection(
    recovery: StableDiffusionRecovery,
) -> None:
    pipe = recovery.pipe
    trainable = {n for n, p in pipe.unet.named_parameters() if p.requires_grad}
    expected = {
        n
        for n, _ in pipe.unet.named_parameters()
        if ".attn2." in f".{n}" or n.startswith("encoder_hid_proj.")
    }
    assert trainable == expected
    assert any(n.startswith("encoder_hid_proj.") for n in trainable)  # the text projection
    assert any(".attn2." in n for n in trainable)
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())
    assert any(".attn1." in n for n, _ in pipe.unet.named_parameters())  # self-attn frozen
    assert is_trainable_name("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")
    assert not is_trainable_name("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k")


def test_finetune_moves_only_trainable_tensors_and_deltas_round_trip(
    recovery: StableDiffusionRecovery,
) -> None:
    unet = recovery.pipe.unet
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    images = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    losses = recovery.finetune(images, CAPTIONS)
    assert len(losses) == SETTINGS.finetune_steps and all(np.isfinite(losses))
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(recovery.spec)
    deltas = recovery.deltas()
    assert set(deltas) == set(recovery.spec)
    assert any(float(d.abs().sum()) > 0 for d in deltas.values())
    recovery.load_deltas({n: torch.zeros_like(d) for n, d in deltas.items()})
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())  # base back
    recovery.load_deltas(deltas)
    assert all(torch.equal(recovery.deltas()[n], d) for n, d in deltas.items())
    with pytest.raises(StableDiffusionSetupError, match="no delta"):
        recovery.load_deltas({})


def test_generated_features_are_cached_per_weight_state(
    recovery: StableDiffusionRecovery,
) -> None:
    cache = recovery.cache
    assert cache is not None
    feats = recovery.recover_features([CAPTIONS[0], CAPTIONS[1], CAPTIONS[0]])
    assert feats.shape == (3, 256) and torch.isfinite(feats).all()
    assert torch.equal(feats[0], feats[2])  # one image per distinct caption
    assert recovery.generated_images == 2 and cache.stats.misses == 1
    again = recovery.recover_features([CAPTIONS[1], CAPTIONS[0]])
    assert torch.equal(again, feats[[1, 0]])
    assert recovery.generated_images == 2 and cache.stats.hits == 1
    # other weights: another key, generated again; reuse_last serves the last generation
    first_identity = recovery.identity
    deltas = {n: torch.full(s, 0.01) for n, s in recovery.spec.items()}
    recovery.load_deltas(deltas)
    assert recovery.identity != first_identity
    recovery.recover_features(CAPTIONS[:2])
    assert recovery.generated_images == 4 and cache.stats.misses == 2
    recovery.load_deltas({n: torch.zeros(s) for n, s in recovery.spec.items()})
    reused = recovery.recover_features(CAPTIONS[:2], reuse_last=True)
    assert recovery.generated_images == 4 and cache.stats.hits == 2
    assert recovery.identity == first_identity  # the weights moved back, the key with them
    assert not torch.equal(reused, feats[:2])  # served from the 0.01-delta generation


def test_spec_and_digest_come_without_weights(checkpoint: Path, tmp_path: Path) -> None:
    rec = StableDiffusionRecovery(checkpoint, SmallCNNImageEncoder.pretrained(), None, SETTINGS)
    assert trainable_spec_of_checkpoint(checkpoint) == rec.spec
    copy = shutil.copytree(checkpoint, tmp_path / "elsewhere")
    assert checkpoint_digest(copy) == checkpoint_digest(checkpoint) == rec.base_digest
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    assert checkpoint_digest(copy) != checkpoint_digest(checkpoint)


def test_rejects_non_checkpoint_and_missing_cuda(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(StableDiffusionSetupError, match="model_index.json"):
        StableDiffusionRecovery(tmp_path, SmallCNNImageEncoder.pretrained())
    if not torch.cuda.is_available():
        with pytest.raises(StableDiffusionSetupError, match="CUDA is not available"):
            StableDiffusionRecovery(checkpoint, SmallCNNImageEncoder.pretrained(), device="cuda")
