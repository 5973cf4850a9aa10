"""FedETF's fixed simplex last layers (model.fixed_classifier): a fixed equiangular frame the
same on every client, learned only in its scale; off by default."""

from __future__ import annotations

import pytest
import torch
from crossfed.client.local_trainer import TrainConfig, train_local
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet, SimplexClassifier
from pydantic import ValidationError
from torch import nn

from tests.support.small_model import tiny_network_config

CONFIG = tiny_network_config(
    num_classes=5,
    diffusion_sample_steps=2,
    memory_capacity=8,
    memory_top_k=2,
    fixed_classifier=True,
)


def _layers(model: CrossModalNet) -> list[nn.Module]:
    return [model.text_classifier[-1], model.image_classifier[-1], model.head]


def test_the_frame_is_equiangular_and_identical_everywhere() -> None:
    before = torch.random.get_rng_state()
    a = SimplexClassifier(16, 5)
    assert torch.equal(torch.random.get_rng_state(), before)  # no draw from torch's generator
    b = SimplexClassifier(16, 5)
    assert torch.equal(a.weight, b.weight)
    gram = a.weight @ a.weight.T
    assert torch.allclose(gram.diagonal(), torch.ones(5), atol=1e-5)
    off = gram[~torch.eye(5, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / 4), atol=1e-5)
    assert [name for name, _ in a.named_parameters()] == ["log_scale"]


def test_training_moves_the_scale_and_never_the_frame() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (90,), generator=g)
    f_t = torch.randn(5, 12, generator=g)[y] + 0.3 * torch.randn(90, 12, generator=g)
    f_i = torch.randn(5, 8, generator=g)[y] + 0.3 * torch.randn(90, 8, generator=g)
    both = torch.ones(90, dtype=torch.bool)
    model = CrossModalNet(CONFIG)
    frames = [layer.weight.clone() for layer in _layers(model)]
    scales = [layer.log_scale.item() for layer in _layers(model)]
    train_local(model, EmbeddingSet(f_t, f_i, both, both, y), TrainConfig(epochs=3, lr=1e-2))
    for layer, frame, scale in zip(_layers(model), frames, scales, strict=True):
        assert torch.equal(layer.weight, frame)
        assert float(layer.log_scale) != scale
    assert "head.weight" in model.shareable_state_dict()  # the server checks it like any tensor


def test_off_by_default_and_refused_where_it_cannot_work() -> None:
    plain = CrossModalNet(CONFIG.model_copy(update={"fixed_classifier": False}))
    assert all(isinstance(layer, nn.Linear) for layer in _layers(plain))
    assert ModelConfig().fixed_classifier is False
    with pytest.raises(ValidationError, match="exclude each other"):
        ModelConfig(fixed_classifier=True, calibrate_image_classifier=True)
    with pytest.raises(ValidationError, match="hidden_dim >= num_classes - 1"):
        ModelConfig(fixed_classifier=True, hidden_dim=4, num_classes=12)
