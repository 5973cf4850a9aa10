"""Pretrained default CNN: shipped weights, loading errors, determinism, and that pretraining
on our procedural corpus yields better features than the seeded random CNN."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from crossfed.common.data.data_errors import DataError, EncoderError
from crossfed.common.data.embedding_cache import EmbeddingCache, encode_images
from crossfed.common.model.encoders import (
    SMALL_CNN_WEIGHTS,
    SMALL_CNN_WEIGHTS_SHA256,
    SmallCNNImageEncoder,
    build_image_encoder,
    load_small_cnn_weights,
)

from tools.cnn_pretraining import (
    PretrainConfig,
    PretrainingError,
    main,
    pretext_probe_scores,
    pretrain,
)
from tools.primitive_corpus import (
    NUM_HUE_BINS,
    PRIMITIVES,
    PrimitiveCorpusConfig,
    generate_primitives,
)

TINY = PretrainConfig(
    steps=3,
    batch_size=16,
    widths=(4, 8),
    strides=(1, 2),
    calibration_samples=64,
    eval_samples=32,
    threads=1,
)
HELD_OUT_STREAM = 7  # never used by the recipe (train 0, calibration 1, eval 2)


@pytest.fixture(scope="module")
def pretrained() -> SmallCNNImageEncoder:
    return SmallCNNImageEncoder.pretrained()


@pytest.fixture(scope="module")
def random_cnn() -> SmallCNNImageEncoder:
    return build_image_encoder("cnn-random")  # type: ignore[return-value]


def test_shipped_weights_match_pinned_digest(
    pretrained: SmallCNNImageEncoder, random_cnn: SmallCNNImageEncoder
) -> None:
    digest = hashlib.sha256(SMALL_CNN_WEIGHTS.read_bytes()).hexdigest()
    assert digest == SMALL_CNN_WEIGHTS_SHA256
    weights, loaded = load_small_cnn_weights(SMALL_CNN_WEIGHTS, SMALL_CNN_WEIGHTS_SHA256)
    assert loaded == digest and digest in pretrained.identity
    assert pretrained.dim == weights.dim == 256
    params = sum(w.numel() + b.numel() for w, b in weights.convs)
    assert 100_000 <= params <= 350_000  # ~300k: small enough to pretrain on 2 CPU cores
    assert "info.recipe" in weights.info  # provenance travels with the file
    default = build_image_encoder("cnn")
    assert default.identity == pretrained.identity
    assert random_cnn.identity == "cnn:v1:seed0:widths48-96-128:dim256"  # unchanged v1 CNN


def test_pretrained_encoder_is_deterministic(pretrained: SmallCNNImageEncoder) -> None:
    images = generate_primitives(np.random.default_rng(3), 40).images
    a = pretrained.encode(images)
    again = SmallCNNImageEncoder.pretrained().encode(images)
    assert torch.equal(a, again) and a.shape == (40, 256) and torch.isfinite(a).all()
    chunked = SmallCNNImageEncoder.pretrained(batch_size=7).encode(images)
    assert torch.allclose(a, chunked, atol=1e-5)
    assert 0.5 < float(a.norm(dim=1).mean()) < 2.0  # ~unit norm like the text side
    big = np.repeat(np.repeat(images[:4], 2, axis=1), 2, axis=2)  # 64x64: resized to 32
    cosine = torch.nn.functional.cosine_similarity(pretrained.encode(big), a[:4], dim=1)
    assert (cosine > 0.8).all(), cosine
    with pytest.raises(EncoderError, match="uint8"):
        pretrained.encode(images.astype(np.float32))
    with pytest.raises(EncoderError, match="H, W, 3"):
        pretrained.encode(images[..., :2])


def test_pretrained_beats_random_on_held_out_corpus_probe(
    pretrained: SmallCNNImageEncoder, random_cnn: SmallCNNImageEncoder
) -> None:
    cfg = PretrainConfig()
    ours = pretext_probe_scores(pretrained, cfg, 600, stream=HELD_OUT_STREAM)
    rand = pretext_probe_scores(random_cnn, cfg, 600, stream=HELD_OUT_STREAM)
    chance = 1.0 / len(PRIMITIVES)
    assert ours["primitive"] > max(rand["primitive"] + 0.15, 3 * chance), (ours, rand)
    assert ours["hue_bin"] > rand["hue_bin"] + 0.1, (ours, rand)
    assert ours["size_bin"] > rand["size_bin"], (ours, rand)


def test_cache_never_reuses_random_cnn_features(
    tmp_path: Path, pretrained: SmallCNNImageEncoder, random_cnn: SmallCNNImageEncoder
) -> None:
    images = generate_primitives(np.random.default_rng(4), 8).images
    cache = EmbeddingCache(tmp_path)
    rand = encode_images(random_cnn, images, cache)
    ours = encode_images(pretrained, images, cache)
    assert cache.stats.misses == 2 and cache.stats.hits == 0
    assert not torch.allclose(rand, ours)
    assert torch.equal(encode_images(pretrained, images, cache), ours)
    assert cache.stats.hits == 1


def test_missing_corrupt_or_mismatched_weights_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="cnn-random"):
        SmallCNNImageEncoder.pretrained(tmp_path / "absent.safetensors")
    raw = bytearray(SMALL_CNN_WEIGHTS.read_bytes())
    flipped = tmp_path / "flipped.safetensors"
    raw[-100] ^= 0xFF  # inside the tensor data
    flipped.write_bytes(bytes(raw))
    with pytest.raises(EncoderError, match="corrupt"):
        load_small_cnn_weights(flipped, SMALL_CNN_WEIGHTS_SHA256)
    with pytest.raises(EncoderError, match="tensor digest"):
        SmallCNNImageEncoder.pretrained(flipped)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(SMALL_CNN_WEIGHTS.read_bytes()[:500])
    with pytest.raises(EncoderError, match="not valid safetensors"):
        SmallCNNImageEncoder.pretrained(truncated)
    with pytest.raises(EncoderError, match="128-d|asked for 128"):
        SmallCNNImageEncoder.pretrained(out_dim=128)
    with pytest.raises(EncoderError, match="neither"):
        build_image_encoder("cnn-pretrained")


def test_recipe_is_reproducible_and_seed_sensitive(tmp_path: Path) -> None:
    first, scores = pretrain(TINY, tmp_path / "a.safetensors", progress=False)
    second, _ = pretrain(TINY, tmp_path / "b.safetensors", progress=False)
    other, _ = pretrain(replace(TINY, seed=1), tmp_path / "c.safetensors", False)
    assert first == second != other
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert set(scores) >= {"primitive", "hue_bin", "size_bin", "quadrant"}
    enc = SmallCNNImageEncoder(out_dim=16, weights=tmp_path / "a.safetensors")
    assert enc.encode(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 16)
    assert first in enc.identity


def test_bad_recipe_and_corpus_settings_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(PretrainingError, match="pair up"):
        PretrainConfig(widths=(8, 16), strides=(1,))
    with pytest.raises(PretrainingError, match="loss_weights"):
        PretrainConfig(loss_weights={"primitive": 1.0})
    with pytest.raises(DataError, match="max_radius"):
        PrimitiveCorpusConfig(max_radius=20.0)
    with pytest.raises(DataError, match="count"):
        generate_primitives(np.random.default_rng(0), 0)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x.safetensors"), "--steps", "0"])


def test_corpus_is_seeded_and_covers_every_factor() -> None:
    a = generate_primitives(np.random.default_rng(11), 600)
    b = generate_primitives(np.random.default_rng(11), 600)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.primitive, b.primitive)
    assert a.images.shape == (600, 32, 32, 3) and a.images.dtype == np.uint8
    assert set(a.primitive.tolist()) == set(range(len(PRIMITIVES)))
    assert set(a.hue_bin.tolist()) == set(range(NUM_HUE_BINS))
    assert set(a.size_bin.tolist()) == {0, 1, 2} and set(a.quadrant.tolist()) == {0, 1, 2, 3}
    plain = PrimitiveCorpusConfig(max_clutter=0, max_noise=1e-6)
    c = generate_primitives(np.random.default_rng(12), 200, plain)
    spread = c.images.reshape(200, -1, 3).astype(np.float32).std(axis=1).max(axis=1)
    assert (spread > 5).all()  # every main object is drawn (not a blank background)
