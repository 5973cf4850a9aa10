"""Frozen encoders (eq. 1): bundled MiniLM, seeded CNN, and any local HF dir (tiny CLIP)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from crossfed.common.data.data_errors import EncoderError
from crossfed.common.model.encoders import (
    SmallCNNImageEncoder,
    build_image_encoder,
    build_text_encoder,
)

from tests.support.tiny_hf_models import save_tiny_clip


def test_cnn_is_identical_across_instances_and_seed_sensitive() -> None:
    images = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    a, b = SmallCNNImageEncoder(seed=0), SmallCNNImageEncoder(seed=0)
    assert torch.equal(a.encode(images), b.encode(images)) and a.identity == b.identity
    c = SmallCNNImageEncoder(seed=1)
    assert c.identity != a.identity and not torch.allclose(a.encode(images), c.encode(images))
    assert a.encode(images).shape == (5, 256)
    big = np.random.default_rng(0).integers(0, 255, (2, 48, 40, 3), dtype=np.uint8)
    assert a.encode(big).shape == (2, 256)  # any size: global pooling
    with pytest.raises(EncoderError, match="H, W, 3"):
        a.encode(images[..., :2])


def test_minilm_understands_synonyms() -> None:
    enc = build_text_encoder("minilm")
    f = enc.encode(["a crimson disc", "a red circle", "a blue square box"])
    assert f.shape == (3, 384) and enc.dim == 384
    assert torch.allclose(f.norm(dim=1), torch.ones(3), atol=1e-5)
    assert float(f[0] @ f[1]) > float(f[0] @ f[2])


def test_hf_dir_encoders_with_tiny_clip(tmp_path: Path) -> None:
    path = save_tiny_clip(tmp_path / "clip")
    text = build_text_encoder(str(path))
    image = build_image_encoder(str(path))
    assert text.dim == 24 and image.dim == 24
    ft = text.encode(["a cat", "a dog", "a cat"])
    assert torch.allclose(ft[0], ft[2]) and not torch.allclose(ft[0], ft[1])
    imgs = np.random.default_rng(0).integers(0, 255, (3, 20, 20, 3), dtype=np.uint8)
    fi = image.encode(imgs)
    assert fi.shape == (3, 24) and torch.isfinite(fi).all()
    assert text.identity != image.identity and "hf-text" in text.identity


def test_bad_encoder_specs(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="neither"):
        build_text_encoder(str(tmp_path / "missing"))
    with pytest.raises(EncoderError, match="neither"):
        build_image_encoder("resnet")
    with pytest.raises(EncoderError, match="config.json"):
        build_text_encoder(str(tmp_path))
