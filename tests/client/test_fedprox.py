"""FedProx (client side): mu/2 ||w - w_global||^2 keeps local weights near the global model;
mu = 0 leaves training exactly as it was; DP-SGD adds the term after privatisation."""

from __future__ import annotations

import copy

import pytest
import torch
from crossfed.client import local_trainer
from crossfed.client.local_trainer import (
    TrainConfig,
    TrainConfigError,
    train_local,
    trained_parameters,
)
from crossfed.client.private_training import DPSGDSettings, train_private
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet
from crossfed.common.model.objective import ProximalTerm

SMALL = ModelConfig(
    text_dim=12,
    image_dim=8,
    hidden_dim=24,
    num_classes=3,
    diffusion_train_steps=10,
    diffusion_sample_steps=2,
    memory_capacity=8,
    memory_top_k=2,
)


def data(n: int, seed: int, text_only: bool = False) -> EmbeddingSet:
    """Separable classes; a third text-only, a third image-only, a third paired (or all
    text-only)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, SMALL.num_classes, (n,), generator=g)
    f_t = torch.randn(SMALL.num_classes, SMALL.text_dim, generator=g)[y]
    f_i = torch.randn(SMALL.num_classes, SMALL.image_dim, generator=g)[y]
    f_t = f_t + 0.5 * torch.randn(n, SMALL.text_dim, generator=g)
    f_i = f_i + 0.5 * torch.randn(n, SMALL.image_dim, generator=g)
    kind = torch.arange(n) % 3
    has_t = torch.ones(n, dtype=torch.bool) if text_only else kind != 2
    has_i = torch.zeros(n, dtype=torch.bool) if text_only else kind != 1
    return EmbeddingSet(f_t * has_t[:, None], f_i * has_i[:, None], has_t, has_i, y)


def drift(model: CrossModalNet, start: CrossModalNet, params_of: EmbeddingSet) -> float:
    """sum ||w - w_global||^2 over the parameters this data trains."""
    before = dict(start.named_parameters())
    trained = {id(p) for p in trained_parameters(model, params_of)}
    return sum(
        float((p.detach() - before[name].detach()).pow(2).sum())
        for name, p in model.named_parameters()
        if id(p) in trained
    )


def train(mu: float, threads: int, train_set: EmbeddingSet) -> tuple[CrossModalNet, float]:
    torch.manual_seed(0)
    start = CrossModalNet(SMALL)
    model = copy.deepcopy(start)
    cfg = TrainConfig(epochs=4, batch_size=32, lr=1e-2, seed=3, num_threads=threads, proximal_mu=mu)
    train_local(model, train_set, cfg)
    return model, drift(model, start, train_set)


@pytest.mark.parametrize("threads", [1, 2])
def test_proximal_term_keeps_local_weights_near_the_global_model(threads: int) -> None:
    train_set = data(150, seed=1)
    _, free = train(0.0, threads, train_set)
    _, held = train(1.0, threads, train_set)
    _, tight = train(10.0, threads, train_set)
    assert free > 0
    assert held < 0.8 * free, (held, free)
    assert tight < held, (tight, held)


def test_mu_zero_builds_no_proximal_term(monkeypatch: pytest.MonkeyPatch) -> None:
    """mu = 0 runs the unchanged code path (test_train_step_equivalence pins that path to
    the reference training loop)."""
    train_set = data(60, seed=2)
    reference, _ = train(0.0, 1, train_set)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("ProximalTerm built with mu = 0")

    monkeypatch.setattr(local_trainer, "ProximalTerm", refuse)
    again, _ = train(0.0, 1, train_set)
    for (name, a), b in zip(
        reference.state_dict().items(), again.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_gradient_is_that_of_the_term_in_the_loss() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    term = ProximalTerm(list(layer.parameters()), mu=0.7)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(4, 5)

    layer.zero_grad()
    layer(x).pow(2).mean().backward()
    term.add_gradient()
    added = [p.grad.clone() for p in layer.parameters() if p.grad is not None]

    layer.zero_grad()
    prox = sum(
        ((p - a).pow(2).sum() for p, a in zip(layer.parameters(), term.anchors, strict=True)),
        start=torch.zeros(()),
    )
    (layer(x).pow(2).mean() + 0.35 * prox).backward()
    for got, want in zip(added, [p.grad for p in layer.parameters()], strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(term.value(), 0.35 * prox.detach())


def test_only_the_modules_this_round_trains_are_anchored() -> None:
    model = CrossModalNet(SMALL)
    text_only = data(30, seed=4, text_only=True)
    anchored = {id(p) for p in trained_parameters(model, text_only)}
    names = {n for n, p in model.named_parameters() if id(p) in anchored}
    assert names and not any(n.startswith(("disentangler.", "image_classifier.")) for n in names)
    assert any(n.startswith("text_classifier.") for n in names)


@pytest.mark.parametrize("mu", [-0.1, float("nan"), float("inf")])
def test_bad_mu_is_refused(mu: float) -> None:
    with pytest.raises(TrainConfigError, match="proximal_mu"):
        TrainConfig(proximal_mu=mu)
    with pytest.raises(ValueError, match="mu"):
        ProximalTerm([], mu)


def test_dp_sgd_round_with_proximal_term_spends_the_same_epsilon() -> None:
    train_set = data(90, seed=5)
    dp = DPSGDSettings(target_epsilon=8.0, target_delta=1e-5, max_grad_norm=1.0)
    runs = {}
    for mu in (0.0, 20.0):
        torch.manual_seed(0)
        start = CrossModalNet(SMALL)
        model = copy.deepcopy(start)
        cfg = TrainConfig(epochs=3, batch_size=30, lr=2e-2, seed=2, proximal_mu=mu)
        torch.manual_seed(1)  # Opacus draws its noise from torch's default generator
        result = train_private(model, train_set, cfg, dp)
        runs[mu] = (drift(model, start, train_set), result)
    (free, plain), (held, prox) = runs[0.0], runs[20.0]
    assert held < 0.8 * free, (held, free)
    assert prox.epsilon_round == plain.epsilon_round and prox.steps == plain.steps
