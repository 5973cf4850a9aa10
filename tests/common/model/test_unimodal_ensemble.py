"""Method changes made for the federated quality benchmark: the eq.-9 unimodal ensemble for
missing configurations, the no-mapper switch, posterior-mean recovery by default, and the
short-schedule fix in the local trainer."""

from __future__ import annotations

import torch
from crossfed.client.local_trainer import TrainConfig, module_samples_of, train_local
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet, Recovery
from torch import nn

CFG = ModelConfig(text_dim=12, image_dim=8, hidden_dim=16, num_classes=3, diffusion_train_steps=10)


def toy(n: int, text_only: int, image_only: int) -> EmbeddingSet:
    gen = torch.Generator().manual_seed(0)
    has_t = torch.ones(n, dtype=torch.bool)
    has_i = torch.ones(n, dtype=torch.bool)
    has_i[:text_only] = False
    has_t[text_only : text_only + image_only] = False
    return EmbeddingSet(
        text=torch.randn(n, 12, generator=gen) * has_t[:, None],
        image=torch.randn(n, 8, generator=gen) * has_i[:, None],
        has_text=has_t,
        has_image=has_i,
        labels=torch.arange(n) % 3,
    )


def test_missing_configs_add_unimodal_log_probs_paired_rows_do_not() -> None:
    torch.manual_seed(0)
    model = CrossModalNet(CFG).eval()
    f_t, f_i = torch.randn(5, 12), torch.randn(5, 8)
    log_p = nn.functional.log_softmax
    fused_text_only = model.predict(f_t, None)
    model.config.unimodal_ensemble = False
    plain_text_only = model.predict(f_t, None)
    plain_image_only = model.predict(None, f_i)
    plain_both = model.predict(f_t, f_i)
    model.config.unimodal_ensemble = True
    expected = log_p(plain_text_only, dim=1) + log_p(model.text_classifier(f_t), dim=1)
    assert torch.allclose(fused_text_only, expected, atol=1e-6)
    expected_i = log_p(plain_image_only, dim=1) + log_p(model.image_classifier(f_i), dim=1)
    assert torch.allclose(model.predict(None, f_i), expected_i, atol=1e-6)
    model.config.paired_ensemble = False
    assert torch.equal(model.predict(f_t, f_i), plain_both)


def test_paired_rows_add_both_unimodal_classifiers() -> None:
    torch.manual_seed(0)
    model = CrossModalNet(CFG).eval()
    f_t, f_i = torch.randn(5, 12), torch.randn(5, 8)
    log_p = nn.functional.log_softmax
    model.config.paired_ensemble = False
    fusion_only = model.predict(f_t, f_i)
    model.config.paired_ensemble = True
    expected = (
        log_p(fusion_only, dim=1)
        + log_p(model.text_classifier(f_t), dim=1)
        + log_p(model.image_classifier(f_i), dim=1)
    )
    assert torch.allclose(model.predict(f_t, f_i), expected, atol=1e-6)
    # a mixed batch: each row gets its own configuration's rule
    has_t = torch.tensor([True, True, False, True, False])
    has_i = torch.tensor([True, False, True, True, True])
    mixed = model(f_t * has_t[:, None], f_i * has_i[:, None], has_t, has_i)
    assert torch.allclose(mixed[0], expected[0], atol=1e-6)
    assert torch.allclose(mixed[3], expected[3], atol=1e-6)


def test_paired_ensemble_leaves_an_interaction_label_to_the_fusion_head() -> None:
    """Label = (text class + image class) mod 3: each modality alone says nothing, so the
    unimodal posteriors stay flat and the ensemble must not undo the fusion head."""
    gen = torch.Generator().manual_seed(1)
    n = 1800
    a, b = torch.randint(0, 3, (n,), generator=gen), torch.randint(0, 3, (n,), generator=gen)
    t_dirs, i_dirs = torch.randn(3, 12, generator=gen), torch.randn(3, 8, generator=gen)
    data = EmbeddingSet(
        text=t_dirs[a] + 0.1 * torch.randn(n, 12, generator=gen),
        image=i_dirs[b] + 0.1 * torch.randn(n, 8, generator=gen),
        has_text=torch.ones(n, dtype=torch.bool),
        has_image=torch.ones(n, dtype=torch.bool),
        labels=(a + b) % 3,
    )
    torch.manual_seed(0)
    model = CrossModalNet(CFG.model_copy(update={"hidden_dim": 32}))
    train_local(
        model, data.subset(torch.arange(1500)), TrainConfig(epochs=30, batch_size=64, lr=2e-3)
    )
    test = data.subset(torch.arange(1500, n))
    model.config.paired_ensemble = False
    fusion = (model.predict(test.text, test.image).argmax(1) == test.labels).float().mean()
    model.config.paired_ensemble = True
    ensemble = (model.predict(test.text, test.image).argmax(1) == test.labels).float().mean()
    assert fusion > 0.9  # the fusion head learned the interaction
    assert ensemble >= fusion - 0.02


def test_zero_fill_baseline_never_uses_the_ensemble() -> None:
    model = CrossModalNet(CFG.model_copy(update={"missing_fill": "zero"})).eval()
    f_t = torch.randn(4, 12)
    n = f_t.shape[0]
    zero_logits = model.classify(
        f_t,
        torch.zeros(n, 8),
        torch.ones(n, dtype=torch.bool),
        torch.zeros(n, dtype=torch.bool),
        None,
    )
    assert torch.allclose(model.predict(f_t, None), zero_logits)


def test_no_mapper_leaves_recovered_text_slot_zero() -> None:
    model = CrossModalNet(
        CFG.model_copy(update={"recover_text": False, "unimodal_ensemble": False})
    ).eval()
    f_i = torch.randn(3, 8)
    n = 3
    expected = model.classify(
        torch.zeros(n, 12),
        f_i,
        torch.zeros(n, dtype=torch.bool),
        torch.ones(n, dtype=torch.bool),
        Recovery(torch.zeros(n, 12), torch.zeros(n, 8)),
    )
    assert torch.allclose(model.predict(None, f_i), expected)
    with_mapper = CrossModalNet(CFG.model_copy(update={"unimodal_ensemble": False})).eval()
    with_mapper.load_state_dict(model.state_dict())
    assert not torch.allclose(with_mapper.predict(None, f_i), expected)


def test_default_inference_recovery_is_one_posterior_mean_step() -> None:
    assert ModelConfig().diffusion_sample_steps == 1


def test_image_classifier_trains_on_image_rows_and_short_schedules_run() -> None:
    data = toy(40, text_only=10, image_only=10)
    model = CrossModalNet(CFG)
    before = {k: v.clone() for k, v in model.image_classifier.state_dict().items()}
    # 40 samples / batch 4 = exactly 10 steps: OneCycleLR divided by zero here before.
    result = train_local(model, data, TrainConfig(epochs=1, batch_size=4))
    assert result.metrics["image_cls"] > 0
    assert module_samples_of(model, data, 1)["image_classifier"] == 30
    after = model.image_classifier.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
