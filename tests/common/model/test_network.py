"""CrossModalNet: federation interface, Table I inference, prototypes, Opacus-friendly layers."""

from __future__ import annotations

import pytest
import torch
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.model_errors import ModelInputError, StateDictError
from crossfed.common.model.network import CrossModalNet
from crossfed.common.model.prototypes import (
    ClassPrototypes,
    apply_global_prototypes,
    compute_class_projections,
)
from torch import nn

SMALL = ModelConfig(
    text_dim=8,
    image_dim=6,
    hidden_dim=16,
    num_classes=3,
    diffusion_train_steps=20,
    diffusion_sample_steps=3,
    memory_capacity=4,
    memory_top_k=2,
)


def net(**overrides: object) -> CrossModalNet:
    torch.manual_seed(0)
    return CrossModalNet(SMALL.model_copy(update=overrides))


def test_shareable_state_excludes_memory_and_round_trips() -> None:
    a, b = net(), net()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    sd = a.shareable_state_dict()
    assert sd and not any(k.startswith("memory.") for k in sd)
    assert {a.module_of(k) for k in sd} == {
        "disentangler",
        "mapper",
        "diffusion",
        "text_classifier",
        "image_classifier",
        "fusion",
        "head",
    }
    assert a.module_of("mapper.net.0.weight") == "mapper"
    b.memory.count[0] = 3
    b.load_shareable_state_dict(sd)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in sd.items())
    assert int(b.memory.count[0]) == 3  # private memory untouched
    with pytest.raises(StateDictError, match="missing"):
        b.load_shareable_state_dict({k: v for k, v in sd.items() if "head" not in k})
    bad = dict(sd)
    bad["head.weight"] = torch.zeros(5, 5)
    with pytest.raises(StateDictError, match="shape mismatch for head.weight"):
        b.load_shareable_state_dict(bad)


def test_trainable_layers_are_opacus_supported() -> None:
    allowed = (nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.Embedding)
    for module in net().modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert isinstance(module, allowed), type(module)


def test_predict_follows_table_one(monkeypatch: pytest.MonkeyPatch) -> None:
    m = net()
    f_t, f_i = torch.randn(4, 8), torch.randn(4, 6)
    calls: list[str] = []
    real_sample = m.diffusion.sample  # type: ignore[union-attr]

    def spy_sample(*args: object, **kw: object) -> torch.Tensor:
        calls.append("diffusion")
        return real_sample(*args, **kw)  # type: ignore[arg-type]

    real_mapper = m.mapper.forward

    def spy_mapper(x: torch.Tensor) -> torch.Tensor:
        calls.append("mapper")
        return real_mapper(x)

    monkeypatch.setattr(m.diffusion, "sample", spy_sample)
    monkeypatch.setattr(m.mapper, "forward", spy_mapper)
    both = m.predict(f_t, f_i)
    assert calls == [] and both.shape == (4, 3)  # both present: nothing recovered
    text_only = m.predict(f_t, None)
    assert calls == ["diffusion"]
    assert torch.equal(text_only, m.predict(f_t, None))  # deterministic sampling noise
    calls.clear()
    m.predict(None, f_i)
    assert calls == ["mapper"]
    # The recovered slot really feeds the classifier: zero-fill gives different logits.
    zero = CrossModalNet(SMALL.model_copy(update={"missing_fill": "zero"}))
    zero.load_state_dict(m.state_dict())
    assert not torch.allclose(zero.predict(f_t, None), text_only)
    assert not torch.allclose(zero.predict(f_t, f_i), both)  # paired ensemble (on by default)
    m.config.paired_ensemble = False
    assert torch.allclose(zero.predict(f_t, f_i), m.predict(f_t, f_i))  # fusion head alone
    with pytest.raises(ModelInputError, match="neither"):
        m.predict(None, None)
    with pytest.raises(ModelInputError, match=r"\[N, 8\]"):
        m.predict(torch.randn(2, 5), None)


def test_text_only_memory_mode_uses_prototypes() -> None:
    m = net(text_only_recovery="memory")
    data = EmbeddingSet(
        text=torch.eye(8)[:3].repeat(2, 1),
        image=torch.arange(36.0).reshape(6, 6),
        has_text=torch.ones(6, dtype=torch.bool),
        has_image=torch.ones(6, dtype=torch.bool),
        labels=torch.tensor([0, 1, 2, 0, 1, 2]),
    )
    protos = compute_class_projections(m, data)
    assert protos.text_count.tolist() == [2.0, 2.0, 2.0]
    assert torch.allclose(protos.image_sum[0], data.image[0] + data.image[3])
    _, image_mean = protos.means()
    assert torch.allclose(image_mean[1], (data.image[1] + data.image[4]) / 2)
    apply_global_prototypes(m, protos + protos)  # server sums; means unchanged
    classes = m.text_classifier(data.text[:1]).argmax(1)
    rec = m.recover_image(data.text[:1])
    assert torch.allclose(rec[0], image_mean[int(classes)])


def test_prototype_wire_form_and_validation() -> None:
    p = ClassPrototypes(
        torch.ones(3, 8),
        torch.ones(3, 6),
        torch.tensor([1.0, 0.0, 2.0]),
        torch.tensor([0.4, 1.0, 1.0]),
    )
    back = ClassPrototypes.from_tensors(p.to_tensors())
    assert torch.equal(back.text_sum, p.text_sum)
    t_mean, i_mean = back.means()
    assert t_mean[1].abs().sum() == 0 and i_mean[0].abs().sum() == 0  # below min_count
    with pytest.raises(ModelInputError, match="lack"):
        ClassPrototypes.from_tensors({"text_sum": p.text_sum})
    with pytest.raises(ModelInputError, match="disagree"):
        ClassPrototypes(torch.ones(3, 8), torch.ones(2, 6), torch.ones(3), torch.ones(3))
    with pytest.raises(ModelInputError, match="classes"):
        apply_global_prototypes(net(num_classes=4), p)
