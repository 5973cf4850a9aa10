"""FedLC's logit adjustment (client side): the classification terms of eq. 14 see the logits
shifted by tau * log(local label prior), so a client holding few classes stops teaching the
shared classifiers that the others are rare; tau = 0 leaves training exactly as it was;
DP-SGD trains without it."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from crossfed.client.local_trainer import TrainConfig, TrainConfigError, train_local
from crossfed.client.private_training import DPSGDSettings, train_private
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.network import CrossModalNet
from crossfed.common.model.objective import classification_loss, label_log_prior

from tests.support.small_model import tiny_network_config

CONFIG = tiny_network_config(
    hidden_dim=24,
    num_classes=4,
    diffusion_sample_steps=2,
    memory_capacity=8,
    memory_top_k=2,
)


def labelled(classes: list[int], n: int, seed: int) -> EmbeddingSet:
    """Paired, text-only and image-only rows of the given classes (class means fixed by a
    shared generator, so every call draws the same classes)."""
    means = torch.Generator().manual_seed(99)
    text_means = 2.0 * torch.randn(CONFIG.num_classes, CONFIG.text_dim, generator=means)
    image_means = 2.0 * torch.randn(CONFIG.num_classes, CONFIG.image_dim, generator=means)
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
    f_t = text_means[y] + torch.randn(n, CONFIG.text_dim, generator=g)
    f_i = image_means[y] + torch.randn(n, CONFIG.image_dim, generator=g)
    kind = torch.arange(n) % 3
    has_t, has_i = kind != 2, kind != 1
    return EmbeddingSet(f_t * has_t[:, None], f_i * has_i[:, None], has_t, has_i, y)


def test_the_prior_follows_the_labels_and_is_finite_for_absent_classes() -> None:
    labels = torch.tensor([0] * 60 + [1] * 30)
    assert label_log_prior(labels, 4, 0.0) is None
    prior = label_log_prior(labels, 4, 1.0)
    assert prior is not None and bool(torch.isfinite(prior).all())
    assert prior[0] > prior[1] > prior[2] == prior[3]
    assert float(prior.exp().sum()) == pytest.approx(1.0, abs=1e-5)
    half = label_log_prior(labels, 4, 0.5)
    assert half is not None and torch.allclose(half, prior / 2)
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="tau"):
            label_log_prior(labels, 4, bad)


def test_the_shift_spares_absent_classes_the_push_down() -> None:
    """A client of class 0 only: plain cross-entropy pushes every other logit down; on the
    shifted logits the push on the classes it never saw is a small fraction of that."""
    y = torch.zeros(32, dtype=torch.long)
    prior = label_log_prior(y, 4, 1.0)
    grads = []
    for shift in (None, prior):
        logits = torch.zeros(32, 4, requires_grad=True)
        classification_loss(logits, y, shift).backward()
        assert logits.grad is not None
        grads.append(logits.grad[:, 1:].sum().item())
    plain, adjusted = grads
    assert plain > 0 and 0 < adjusted < 0.2 * plain, (plain, adjusted)
    logits = torch.randn(5, 4)
    assert torch.equal(
        classification_loss(logits, y[:5], None), torch.nn.functional.cross_entropy(logits, y[:5])
    )


def _kept(tau: float) -> float:
    """Text-classifier accuracy (eq. 9) on the classes a client lacks after it trains the
    global model on its own two: a model that knew four classes, tuned by a two-class client
    (the drift FedLC targets)."""
    torch.manual_seed(0)
    model = CrossModalNet(CONFIG)
    train_local(model, labelled([0, 1, 2, 3], 400, seed=1), TrainConfig(epochs=6, lr=1e-2))
    cfg = TrainConfig(epochs=6, batch_size=32, lr=1e-2, seed=2, logit_adjustment=tau)
    train_local(model, labelled([0, 1], 200, seed=3), cfg)
    absent = labelled([2, 3], 300, seed=4)
    with torch.no_grad():
        guesses = model.text_classifier(absent.text[absent.has_text]).argmax(1)
    return float((guesses == absent.labels[absent.has_text]).float().mean())


def test_adjusted_local_training_forgets_less_of_the_classes_the_client_lacks() -> None:
    plain, adjusted = _kept(0.0), _kept(1.0)
    assert adjusted > plain + 0.05, (plain, adjusted)


def test_tau_zero_trains_exactly_as_before() -> None:
    data = labelled([0, 1], 120, seed=5)
    torch.manual_seed(0)
    a = CrossModalNet(CONFIG)
    b = copy.deepcopy(a)
    train_local(a, data, TrainConfig(epochs=2, seed=1, num_threads=1))
    train_local(b, data, TrainConfig(epochs=2, seed=1, num_threads=1, logit_adjustment=0.0))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("bad", [-1.0, math.nan])
def test_a_bad_tau_is_refused(bad: float) -> None:
    with pytest.raises(TrainConfigError, match="logit_adjustment"):
        TrainConfig(logit_adjustment=bad)


def test_dp_sgd_trains_without_it_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """The prior is counted from the private labels, which DP-SGD's accounting cannot cover:
    the private trainer leaves it out (same weights as tau 0) and logs why."""
    data = labelled([0, 1], 90, seed=6)
    dp = DPSGDSettings(target_epsilon=5.0, target_delta=1e-5, max_grad_norm=1.0)
    trained = []
    for tau in (0.0, 1.0):
        torch.manual_seed(0)
        model = CrossModalNet(CONFIG)
        with caplog.at_level(logging.WARNING):
            train_private(model, data, TrainConfig(epochs=1, seed=1, logit_adjustment=tau), dp)
        trained.append(model.state_dict())
    assert "logit adjustment" in caplog.text and "DP-SGD trains without it" in caplog.text
    for name, value in trained[0].items():
        assert torch.equal(value, trained[1][name]), name
