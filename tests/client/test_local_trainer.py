"""Local trainer: learning works, module sample counts, evaluation per Table I config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from crossfed.client.local_trainer import (
    TrainConfig,
    TrainConfigError,
    load_model,
    run_local_training,
    train_local,
)
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.evaluation import confusion_matrix, evaluate, macro_f1
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet

CFG = ModelConfig(
    text_dim=12,
    image_dim=8,
    hidden_dim=32,
    num_classes=4,
    diffusion_train_steps=20,
    diffusion_sample_steps=3,
    memory_capacity=16,
    memory_top_k=4,
    memory_tau=0.5,
)


def toy_set(n: int, seed: int, text_only: float = 0.25, image_only: float = 0.25) -> EmbeddingSet:
    """Label = (a, b); text reveals a, image reveals b; each gives a noisy hint of the other."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    a, b = y // 2, y % 2
    fixed = torch.Generator().manual_seed(99)  # the same class directions in every split
    t_dirs, i_dirs = torch.randn(4, 12, generator=fixed), torch.randn(4, 8, generator=fixed)
    text = t_dirs[a] + 0.6 * t_dirs[2 + b] + 0.3 * torch.randn(n, 12, generator=g)
    image = i_dirs[b] + 0.6 * i_dirs[2 + a] + 0.3 * torch.randn(n, 8, generator=g)
    r = torch.rand(n, generator=g)
    has_t = r >= image_only
    has_i = r < 1 - text_only
    return EmbeddingSet(
        text=text * has_t[:, None] / 4,
        image=image * has_i[:, None] / 3,
        has_text=has_t,
        has_image=has_i,
        labels=y,
    )


def test_training_learns_every_configuration() -> None:
    torch.manual_seed(0)
    model = CrossModalNet(CFG)
    train, test = toy_set(1200, 0), toy_set(400, 1, 0.0, 0.0)
    before = evaluate(model, test)
    result = train_local(model, train, TrainConfig(epochs=6, batch_size=128, lr=3e-3))
    after = evaluate(model, test)
    assert after["both"]["accuracy"] > 0.95 > before["both"]["accuracy"]
    assert after["text_only"]["accuracy"] > 0.6 and after["image_only"]["accuracy"] > 0.6
    assert after["both"]["count"] == 400 and 0 <= after["both"]["macro_f1"] <= 1
    assert result.num_samples == 1200 and result.samples_per_second > 0
    assert set(result.metrics) == {"cls", "text_cls", "image_cls", "orth", "align", "diff", "mem"}
    assert len(result.history) == 6 and result.history[-1]["cls"] < result.history[0]["cls"]
    assert int(model.memory.count.sum()) > 0  # eq. 8 admitted confident pairs


def test_module_samples_reflect_who_trained_what() -> None:
    data = toy_set(200, 2, text_only=0.0, image_only=1.0)  # image-only client
    model = CrossModalNet(CFG)
    mapper_before = {k: v.clone() for k, v in model.mapper.state_dict().items()}
    res = train_local(model, data, TrainConfig(epochs=1, batch_size=64))
    assert res.module_samples["mapper"] == 0 and res.module_samples["diffusion"] == 0
    assert res.module_samples["text_classifier"] == 0
    assert res.module_samples["disentangler"] == 200 and res.module_samples["fusion"] == 200
    assert "memory" not in res.module_samples
    # no gradient reached the mapper: at most AdamW's tiny weight decay moved it
    for k, v in model.mapper.state_dict().items():
        assert torch.allclose(v, mapper_before[k], rtol=1e-3, atol=1e-6), k
    zero = CrossModalNet(CFG.model_copy(update={"missing_fill": "zero"}))
    res = train_local(zero, toy_set(100, 3), TrainConfig(epochs=1, batch_size=64))
    assert res.module_samples["mapper"] == 0 and res.module_samples["head"] == 100


def test_evaluate_hides_modalities() -> None:
    model = CrossModalNet(CFG)
    data = toy_set(50, 4)
    out = evaluate(model, data)
    assert out["both"]["count"] == int((data.has_text & data.has_image).sum())
    assert out["text_only"]["count"] == int(data.has_text.sum())
    assert out["image_only"]["count"] == int(data.has_image.sum())
    only_text = toy_set(20, 5, text_only=1.0, image_only=0.0)
    res = evaluate(model, only_text)
    assert res["both"]["count"] == 0 and res["image_only"]["count"] == 0


def test_confusion_matrix_counts_true_by_predicted() -> None:
    t, p = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 1, 1, 2, 0])
    assert confusion_matrix(p, t, 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_macro_f1() -> None:
    p, t = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])
    # class 0: tp1 fp1 fn0 -> 2/3; class 1: tp2 fp0 fn1 -> 4/5
    assert abs(macro_f1(p, t, 3) - (2 / 3 + 4 / 5) / 2) < 1e-9


def test_bad_config_and_data_are_named() -> None:
    with pytest.raises(TrainConfigError, match="modality_dropout"):
        TrainConfig(modality_dropout=2.0)
    with pytest.raises(TrainConfigError, match="lr"):
        TrainConfig(lr=0)
    wrong = CrossModalNet(CFG.model_copy(update={"text_dim": 5}))
    with pytest.raises(TrainConfigError, match="dims"):
        train_local(wrong, toy_set(10, 0), TrainConfig(epochs=1))


def test_run_local_training_round_trip(tmp_path: Path) -> None:
    data = toy_set(150, 6)
    data.save(tmp_path / "train.safetensors")
    model, res, scores = run_local_training(
        tmp_path / "train.safetensors",
        CFG,
        TrainConfig(epochs=1, batch_size=64),
        output=tmp_path / "model.safetensors",
        progress=False,
    )
    again = load_model(tmp_path / "model.safetensors")
    assert again.config == CFG
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    assert set(scores) == {"both", "text_only", "image_only"} and res.num_samples == 150
    with pytest.raises(TrainConfigError, match="not found"):
        load_model(tmp_path / "nope.safetensors")
