"""Unit tests for eq. 2-5 and 8-13: each asserts a property that a wrong implementation breaks."""

from __future__ import annotations

import torch
from crossfed.common.model.disentangler import Disentangler, orthogonality_loss
from crossfed.common.model.fusion import fusion_slots
from crossfed.common.model.mapper import CrossModalMapper, squared_l2
from crossfed.common.model.memory import VisualLinguisticMemory


def test_disentangler_parts_sum_to_input() -> None:  # eq. 2
    torch.manual_seed(0)
    d = Disentangler(16, 8)
    f_i = torch.randn(32, 16)
    f_it, f_iv = d(f_i)
    assert torch.allclose(f_it + f_iv, f_i, rtol=0, atol=1e-6)
    assert not torch.allclose(f_it, torch.zeros_like(f_it))


def test_orthogonality_loss() -> None:  # eq. 3
    a = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 3.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    assert float(orthogonality_loss(a, b)) == 0.0
    c = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0]])
    # per-sample |<a, c>| = 2 and 2 -> mean 2, divided by sqrt(4)
    assert abs(float(orthogonality_loss(a, c)) - 1.0) < 1e-6
    assert float(orthogonality_loss(a[:0], c[:0])) == 0.0


def test_alignment_loss_is_mean_squared_l2() -> None:  # eq. 5
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    tgt = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    assert float(squared_l2(pred, tgt)) == (4.0 + 25.0) / 2
    m = CrossModalMapper(6, 5, 8)
    assert m(torch.randn(3, 6)).shape == (3, 5)


def test_memory_admits_only_confidence_above_tau() -> None:  # eq. 8
    mem = VisualLinguisticMemory(
        num_classes=3, capacity=4, text_dim=2, image_dim=2, tau=0.8, top_k=2
    )
    f = torch.eye(2).repeat(2, 1)
    n = mem.admit(f, f * 10, torch.tensor([0, 0, 1, 2]), torch.tensor([0.9, 0.8, 0.95, 0.1]))
    assert n == 2 and mem.count.tolist() == [1, 1, 0]
    assert torch.equal(mem.image[0, 0], torch.tensor([10.0, 0.0]))


def test_memory_ring_buffer_keeps_newest() -> None:
    mem = VisualLinguisticMemory(2, capacity=3, text_dim=1, image_dim=1, tau=0.0, top_k=3)
    for v in range(5):
        mem.admit(
            torch.tensor([[1.0]]),
            torch.tensor([[float(v)]]),
            torch.tensor([0]),
            torch.tensor([1.0]),
        )
    assert mem.count[0] == 3
    assert sorted(mem.image[0, :, 0].tolist()) == [2.0, 3.0, 4.0]


def test_top_k_retrieval_averages_nearest_of_the_class() -> None:  # eq. 10
    mem = VisualLinguisticMemory(2, capacity=4, text_dim=2, image_dim=1, tau=0.0, top_k=2)
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    vals = torch.tensor([[1.0], [3.0], [100.0], [7.0], [-50.0]])
    labels = torch.tensor([0, 0, 0, 0, 1])
    mem.admit(keys, vals, labels, torch.ones(5))
    out = mem.retrieve(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    # two most similar in class 0: [1,0] (1.0) and [0.9,0.1] (3.0); class-1 entry excluded
    assert torch.allclose(out, torch.tensor([[2.0]]))
    # fewer than K entries: average what exists; none: zero and has_entries False
    mem2 = VisualLinguisticMemory(2, capacity=4, text_dim=2, image_dim=1, tau=0.0, top_k=3)
    mem2.admit(keys[:1], vals[:1], labels[:1], torch.ones(1))
    assert torch.allclose(mem2.retrieve(keys[:1], torch.tensor([0])), torch.tensor([[1.0]]))
    assert mem2.has_entries(torch.tensor([0, 1])).tolist() == [True, False]


def test_prototypes_are_retrievable_entries() -> None:
    mem = VisualLinguisticMemory(2, capacity=4, text_dim=2, image_dim=1, tau=0.0, top_k=2)
    mem.set_prototypes(
        torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        torch.tensor([[4.0], [9.0]]),
        torch.tensor([False, True]),
    )
    assert mem.has_entries(torch.tensor([0, 1])).tolist() == [False, True]
    assert torch.allclose(
        mem.retrieve(torch.tensor([[1.0, 1.0]]), torch.tensor([1])), torch.tensor([[9.0]])
    )


def test_fusion_slots_follow_table_one() -> None:  # eq. 12 inputs
    f_t, f_i = torch.ones(3, 2), 2 * torch.ones(3, 1)
    rec_t, rec_i = 5 * torch.ones(3, 2), 7 * torch.ones(3, 1)
    has_t = torch.tensor([True, True, False])
    has_i = torch.tensor([True, False, True])
    s = fusion_slots(f_t, f_i, has_t, has_i, rec_t, rec_i)
    assert s[0].tolist() == [1, 1, 1, 1, 2, 2]  # both: real features, no recovery used
    assert s[1].tolist() == [1, 1, 1, 1, 0, 7]  # text-only: f_t and f^_i
    assert s[2].tolist() == [0, 0, 5, 5, 2, 2]  # image-only: f^_t and f_i
    z = fusion_slots(f_t, f_i, has_t, has_i, None, None)
    assert z[1].tolist() == [1, 1, 1, 1, 0, 0] and z[2].tolist() == [0, 0, 0, 0, 2, 2]
