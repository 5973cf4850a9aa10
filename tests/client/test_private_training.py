"""DP-SGD local training: per-sample objective, epsilon within target, ledger over rounds."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from crossfed.client.local_trainer import TrainConfig
from crossfed.client.private_training import (
    TERMS,
    DPSGDLedger,
    DPSGDSettings,
    PerSampleObjective,
    WeightedTerms,
    _noise_only_step,
    planned_round,
    train_private,
)
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.evaluation import evaluate
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet
from crossfed.common.model.objective import weight_vector
from crossfed.common.privacy.dp_sgd import DPSGDError
from crossfed.common.privacy.privacy_accountant import PrivacyAccountantError
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

SMALL = ModelConfig(text_dim=16, image_dim=12, hidden_dim=32, num_classes=4)


def _data(n: int, seed: int = 0, config: ModelConfig = SMALL) -> EmbeddingSet:
    """Separable classes; a third text-only, a third image-only, a third paired."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, config.num_classes, (n,), generator=g)
    centers_t = 3 * torch.randn(config.num_classes, config.text_dim, generator=g)
    centers_i = 3 * torch.randn(config.num_classes, config.image_dim, generator=g)
    f_t = centers_t[y] + torch.randn(n, config.text_dim, generator=g)
    f_i = centers_i[y] + torch.randn(n, config.image_dim, generator=g)
    kind = torch.arange(n) % 3
    has_t, has_i = kind != 2, kind != 1
    return EmbeddingSet(f_t * has_t[:, None], f_i * has_i[:, None], has_t, has_i, y)


DP = DPSGDSettings(target_epsilon=4.0, target_delta=1e-5, max_grad_norm=1.0)


def test_each_row_of_the_objective_depends_on_its_own_sample_only() -> None:
    """DP-SGD clips per sample: changing sample j must leave every other row's loss alone."""
    data = _data(24)
    model = CrossModalNet(SMALL).train()
    cfg = TrainConfig(modality_dropout=0.3)

    def rows(text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        objective = PerSampleObjective(model, cfg, torch.Generator().manual_seed(7))
        torch.manual_seed(0)
        return objective(text, image, data.has_text, data.has_image, data.labels).detach()

    before = rows(data.text, data.image)
    text, image = data.text.clone(), data.image.clone()
    j = 3  # a paired row (kind 0)
    text[j] += 5.0
    image[j] -= 5.0
    after = rows(text, image)
    others = torch.arange(24) != j
    assert torch.allclose(before[others], after[others], atol=1e-6)
    assert not torch.allclose(before[j], after[j])
    # Masked terms: a text-only row has no image-side terms, an image-only row no text term.
    assert before[1, 2] == 0 and before[1, 3] == 0 and before[2, 1] == 0


def test_ghost_clipped_update_is_the_mean_of_per_sample_clipped_gradients() -> None:
    """With zero noise, Opacus' update must equal sum_j clip_C(grad of sample j) / B."""
    data = _data(9)
    tensors = (data.text, data.image, data.has_text, data.has_image, data.labels)
    model = CrossModalNet(SMALL).train()
    clip = 0.05  # small enough that every sample is clipped
    weights = weight_vector(TERMS, model.config.loss_weights)
    twin = copy.deepcopy(model)
    rows = PerSampleObjective(model, TrainConfig(), torch.Generator().manual_seed(3))(*tensors)
    params = list(model.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for j in range(len(data)):
        grads = torch.autograd.grad(rows[j] @ weights, params, retain_graph=True, allow_unused=True)
        grads = [
            torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)
        ]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        assert norm > clip
        for e, g in zip(expected, grads, strict=True):
            e += g * (clip / (norm + 1e-6))
    before = [p.detach().clone() for p in twin.parameters()]
    objective = PerSampleObjective(twin, TrainConfig(), torch.Generator().manual_seed(3))
    module, optimizer, criterion, loader = PrivacyEngine().make_private(
        module=objective,
        optimizer=torch.optim.SGD(twin.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(*tensors), batch_size=len(data)),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        poisson_sampling=False,
        criterion=WeightedTerms(weights),
        grad_sample_mode="ghost",
    )
    loss = criterion(module(*next(iter(loader))))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for b, p, e in zip(before, twin.parameters(), expected, strict=True):
        assert torch.allclose(b - p.detach(), e / len(data), atol=1e-6, rtol=1e-4)


def test_an_empty_poisson_batch_is_still_a_noisy_accounted_step() -> None:
    data = _data(10)
    tensors = (data.text, data.image, data.has_text, data.has_image, data.labels)
    model = CrossModalNet(SMALL).train()
    engine = PrivacyEngine()
    _, optimizer, _, _ = engine.make_private(
        module=PerSampleObjective(model, TrainConfig(), torch.Generator()),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(*tensors), batch_size=5),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        criterion=WeightedTerms(weight_vector(TERMS, model.config.loss_weights)),
        grad_sample_mode="ghost",
    )
    before = model.head.weight.detach().clone()
    _noise_only_step(optimizer)
    assert engine.accountant.history == [(1.0, 0.5, 1)]
    assert not torch.equal(model.head.weight.detach(), before)  # noise was added


def test_private_round_learns_and_reports_epsilon_within_target(tmp_path: Path) -> None:
    data = _data(240)
    model = CrossModalNet(SMALL)
    ledger = DPSGDLedger(tmp_path)
    cfg = TrainConfig(epochs=3, batch_size=48, lr=5e-3, seed=1)
    result = train_private(model, data, cfg, DP, ledger)
    assert 0 < result.epsilon_round <= DP.target_epsilon
    assert result.noise_multiplier > 0.3  # calibrated, not a no-op
    assert result.steps == 3 * round(1 / result.sample_rate)
    # what a budget check plans before training is what the round spent
    assert planned_round(len(data), cfg, DP) == pytest.approx(
        (result.noise_multiplier, result.sample_rate, result.steps)
    )
    assert math.isclose(ledger.epsilon(DP.target_delta), result.epsilon_round, rel_tol=1e-6)
    scores = evaluate(model, data)
    assert scores["both"]["accuracy"] > 0.6  # well above chance (0.25) despite the noise
    # Opacus' hooks are gone: ordinary training/inference afterwards sees a plain module.
    assert not any(getattr(p, "grad_sample", None) is not None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_ledger_composes_rounds_and_survives_a_restart(tmp_path: Path) -> None:
    data = _data(120)
    cfg = TrainConfig(epochs=1, batch_size=40)
    model = CrossModalNet(SMALL)
    first = train_private(model, data, cfg, DP, DPSGDLedger(tmp_path))
    ledger = DPSGDLedger(tmp_path)  # a restarted client reads what it spent
    second = train_private(model, data, replace_seed(cfg, 2), DP, ledger)
    total = ledger.epsilon(DP.target_delta)
    assert total > max(first.epsilon_round, second.epsilon_round)
    opacus = RDPAccountant()
    opacus.history = [
        (first.noise_multiplier, first.sample_rate, first.steps),
        (second.noise_multiplier, second.sample_rate, second.steps),
    ]
    assert math.isclose(total, opacus.get_epsilon(DP.target_delta), rel_tol=1e-6)
    (tmp_path / "dp_sgd_accountant.json").write_text("{not json")
    with pytest.raises(PrivacyAccountantError, match="cannot read"):
        DPSGDLedger(tmp_path)


def replace_seed(cfg: TrainConfig, seed: int) -> TrainConfig:
    from dataclasses import replace

    return replace(cfg, seed=seed)


def test_zero_fill_baseline_trains_privately_and_keeps_other_modules_trainable() -> None:
    config = SMALL.model_copy(update={"missing_fill": "zero"})
    model = CrossModalNet(config)
    untouched = model.mapper.net[0].weight.detach().clone()
    result = train_private(model, _data(90), TrainConfig(epochs=1, batch_size=30), DP)
    assert result.epsilon_round <= DP.target_epsilon
    assert torch.equal(model.mapper.net[0].weight, untouched)
    assert all(p.requires_grad for p in model.parameters())


def test_bad_settings_are_clear_errors() -> None:
    model = CrossModalNet(SMALL)
    with pytest.raises(DPSGDError, match="target_epsilon"):
        train_private(model, _data(30), TrainConfig(epochs=1), DPSGDSettings(0.0, 1e-5, 1.0))
    with pytest.raises(DPSGDError, match="at least one sample"):
        train_private(model, _data(30), TrainConfig(epochs=0), DP)
