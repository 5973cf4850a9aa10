"""The fast training step computes what the per-module reference step computed (eq. 2-14).

The reference functions below are the earlier implementations (per-class VLMR loops, 4-slot
fusion input, one pass per module over boolean-masked rows, foreach AdamW), kept verbatim
apart from calling each other; every test feeds both the same state and the same seeded
random numbers and compares losses, gradients and memory contents.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from crossfed.client.local_trainer import (
    TrainConfig,
    _dropout_view,
    _step_losses,
    evaluate,
    train_local,
)
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.disentangler import orthogonality_loss
from crossfed.common.model.fusion import SHARED_SLOT_MIN_ROWS, FusionMLP, fusion_slots
from crossfed.common.model.mapper import squared_l2
from crossfed.common.model.memory import VisualLinguisticMemory
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet, Recovery
from torch import nn

CFG = ModelConfig(
    text_dim=24,
    image_dim=16,
    hidden_dim=32,
    num_classes=5,
    diffusion_train_steps=20,
    memory_capacity=16,
    memory_top_k=4,
    memory_tau=0.5,
)
TERMS = ("cls", "text_cls", "image_cls", "orth", "align", "diff", "mem")


# -- reference implementations ---------------------------------------------------------------
@torch.no_grad()
def ref_admit(
    mem: VisualLinguisticMemory,
    f_t: torch.Tensor,
    f_i: torch.Tensor,
    labels: torch.Tensor,
    confidence: torch.Tensor,
) -> int:
    keep = confidence > mem.tau
    if not bool(keep.any()):
        return 0
    f_t, f_i, labels = f_t[keep], f_i[keep], labels[keep]
    for cls in labels.unique().tolist():
        rows = (labels == cls).nonzero().squeeze(1)[-mem.capacity :]
        slots = (mem.cursor[cls] + torch.arange(len(rows))) % mem.capacity
        mem.text[cls, slots] = f_t[rows]
        mem.image[cls, slots] = f_i[rows]
        mem.cursor[cls] = (mem.cursor[cls] + len(rows)) % mem.capacity
        mem.count[cls] = torch.clamp(mem.count[cls] + len(rows), max=mem.capacity)
    return int(keep.sum())


@torch.no_grad()
def ref_retrieve(
    mem: VisualLinguisticMemory, f_t: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    out = torch.zeros(f_t.shape[0], mem.image.shape[2], dtype=mem.image.dtype)
    queries = nn.functional.normalize(f_t, dim=1)
    for cls in classes.unique().tolist():
        rows = (classes == cls).nonzero().squeeze(1)
        n = int(mem.count[cls])
        keys, values = mem.text[cls, :n], mem.image[cls, :n]
        if bool(mem.proto_valid[cls]):
            keys = torch.cat([keys, mem.proto_text[cls : cls + 1]])
            values = torch.cat([values, mem.proto_image[cls : cls + 1]])
        if keys.shape[0] == 0:
            continue
        sims = queries[rows] @ nn.functional.normalize(keys, dim=1).T
        top = sims.topk(min(mem.top_k, keys.shape[0]), dim=1).indices
        out[rows] = values[top].mean(dim=1)
    return out


def ref_classify(model: CrossModalNet, f_t, f_i, has_t, has_i, rec) -> torch.Tensor:  # type: ignore[no-untyped-def]
    slots = fusion_slots(
        f_t,
        f_i,
        has_t,
        has_i,
        None if rec is None else rec.text,
        None if rec is None else rec.image,
    )
    return model.head(model.fusion(slots))


def ref_step_losses(  # type: ignore[no-untyped-def]
    model: CrossModalNet, f_t, f_i, has_t, has_i, y, cfg: TrainConfig, gen, external=None
) -> tuple[torch.Tensor, dict[str, float]]:
    view_t, view_i = _dropout_view(has_t, has_i, cfg.modality_dropout, gen)
    lam = model.config.loss_weights
    paired = has_t & has_i
    zero = f_t.new_zeros(())
    img_rows = has_i.nonzero().squeeze(1)
    f_it, f_iv = model.disentangler(f_i[img_rows])
    l_orth = orthogonality_loss(f_it, f_iv)
    hat_t_img = model.mapper(f_it)
    paired_in_img = paired[img_rows]
    l_align = squared_l2(hat_t_img[paired_in_img], f_t[img_rows][paired_in_img])
    assert model.diffusion is not None
    l_diff = model.diffusion.loss(f_i[paired], f_t[paired], gen)
    l_mem = zero
    if lam.mem > 0 and bool(paired.any()):
        y_p = y[paired]
        ok = model.memory.has_entries(y_p)
        if bool(ok.any()):
            retrieved = ref_retrieve(model.memory, f_t[paired], y_p)
            l_mem = squared_l2(f_iv[paired_in_img][ok], retrieved[ok])
    rec_t = torch.zeros_like(f_t)
    rec_i = torch.zeros_like(f_i)
    view_img_only = view_i & ~view_t
    if bool(view_img_only.any()) and model.config.recover_text:
        full = torch.zeros_like(f_t)
        full[img_rows] = hat_t_img.detach()
        rec_t[view_img_only] = full[view_img_only]
    view_text_only = view_t & ~view_i
    if bool(view_text_only.any()):
        ext = None if external is None else external[view_text_only]
        rec_i[view_text_only] = model.recover_image(
            f_t[view_text_only], gen, ext, steps=cfg.train_recovery_steps
        )
    logits = ref_classify(model, f_t, f_i, view_t, view_i, Recovery(rec_t, rec_i))
    l_cls = nn.functional.cross_entropy(logits, y)
    ce = nn.functional.cross_entropy
    l_tc = ce(model.text_classifier(f_t[has_t]), y[has_t]) if bool(has_t.any()) else zero
    l_ic = ce(model.image_classifier(f_i[has_i]), y[has_i]) if bool(has_i.any()) else zero
    both_view = view_t & view_i
    if bool(both_view.any()):
        conf = logits.detach()[both_view].softmax(dim=1).gather(1, y[both_view, None]).squeeze(1)
        ref_admit(model.memory, f_t[both_view], f_i[both_view], y[both_view], conf)
    total = (
        l_cls
        + l_tc
        + l_ic
        + lam.orth * l_orth
        + lam.align * l_align
        + lam.diff * l_diff
        + lam.mem * l_mem
    )
    values = (l_cls, l_tc, l_ic, l_orth, l_align, l_diff, l_mem)
    return total, {k: float(v.detach()) for k, v in zip(TERMS, values, strict=True)}


def ref_train(model: CrossModalNet, data: EmbeddingSet, cfg: TrainConfig) -> list[dict]:  # type: ignore[type-arg]
    """The earlier train_local loop (foreach AdamW, OneCycleLR) around ref_step_losses."""
    gen = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    n = len(data)
    steps = math.ceil(n / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps, pct_start=0.1
    )
    model.train()
    history = []
    for _ in range(cfg.epochs):
        sums: dict[str, float] = {}
        order = torch.randperm(n, generator=gen)
        for b in range(steps):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            total, terms = ref_step_losses(
                model,
                data.text[idx],
                data.image[idx],
                data.has_text[idx],
                data.has_image[idx],
                data.labels[idx],
                cfg,
                gen,
            )
            opt.zero_grad(set_to_none=True)
            total.backward()
            assert cfg.max_grad_norm
            nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx)
        history.append({k: v / n for k, v in sums.items()})
    model.eval()
    return history


# -- data ------------------------------------------------------------------------------------
def toy_set(n: int, seed: int, text_only: float = 0.2, image_only: float = 0.2) -> EmbeddingSet:
    """Class directions + noise in each modality; absent modalities are zero rows."""
    g = torch.Generator().manual_seed(seed)
    fixed = torch.Generator().manual_seed(7)
    t_dirs = torch.randn(CFG.num_classes, CFG.text_dim, generator=fixed)
    i_dirs = torch.randn(CFG.num_classes, CFG.image_dim, generator=fixed)
    y = torch.randint(0, CFG.num_classes, (n,), generator=g)
    text = (t_dirs[y] + 1.2 * torch.randn(n, CFG.text_dim, generator=g)) / CFG.text_dim**0.5
    image = (i_dirs[y] + 1.2 * torch.randn(n, CFG.image_dim, generator=g)) / CFG.image_dim**0.5
    r = torch.rand(n, generator=g)
    has_t, has_i = r >= image_only, r < 1 - text_only
    return EmbeddingSet(
        text=text * has_t[:, None],
        image=image * has_i[:, None],
        has_text=has_t,
        has_image=has_i,
        labels=y,
    )


# -- VLMR (eq. 8, 10) ------------------------------------------------------------------------
def _memory(capacity: int = 6, top_k: int = 3, tau: float = 0.3) -> VisualLinguisticMemory:
    return VisualLinguisticMemory(
        num_classes=4, capacity=capacity, text_dim=5, image_dim=3, tau=tau, top_k=top_k
    )


def test_vectorised_admission_matches_per_class_loop() -> None:  # eq. 8
    g = torch.Generator().manual_seed(0)
    fast, ref = _memory(), _memory()
    # batches larger than the capacity of one class, smaller ones, and none admitted
    for n in (3, 17, 40, 1, 9, 30):
        f_t, f_i = torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)
        labels = torch.randint(0, 3, (n,), generator=g)  # class 3 never admitted
        conf = torch.rand(n, generator=g)
        assert fast.admit(f_t, f_i, labels, conf) == ref_admit(ref, f_t, f_i, labels, conf)
        for name in ("text", "image", "count", "cursor"):
            assert torch.equal(getattr(fast, name), getattr(ref, name)), (n, name)
    assert int(fast.count[3]) == 0 and int(fast.count[:3].min()) == fast.capacity


@pytest.mark.parametrize("skewed", [False, True])
def test_vectorised_retrieval_matches_per_class_loop(skewed: bool) -> None:  # eq. 10
    g = torch.Generator().manual_seed(1)
    mem = _memory(capacity=8, top_k=3, tau=0.0)
    # class 0 full, class 1 two entries (< K), class 2 prototype only, class 3 nothing
    mem.admit(torch.randn(12, 5, generator=g), torch.randn(12, 3, generator=g),
              torch.zeros(12, dtype=torch.long), torch.ones(12))  # fmt: skip
    mem.admit(torch.randn(2, 5, generator=g), torch.randn(2, 3, generator=g),
              torch.ones(2, dtype=torch.long), torch.ones(2))  # fmt: skip
    mem.set_prototypes(
        torch.randn(4, 5, generator=g),
        torch.randn(4, 3, generator=g),
        torch.tensor([True, False, True, False]),
    )
    n = 200
    if skewed:  # nearly every query one class: the grouped (copying) path
        classes = torch.where(torch.rand(n, generator=g) < 0.97, 0, 3)
    else:
        classes = torch.randint(0, 4, (n,), generator=g)
    queries = torch.randn(n, 5, generator=g)
    got, want = mem.retrieve(queries, classes), ref_retrieve(mem, queries, classes)
    assert torch.allclose(got, want, atol=1e-6)
    empty = ~mem.has_entries(classes)
    assert bool(empty.any()) and bool((got[empty] == 0).all())
    assert mem.retrieve(queries[:0], classes[:0]).shape == (0, 3)


# -- fusion (eq. 12) -------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [SHARED_SLOT_MIN_ROWS // 2, 2 * SHARED_SLOT_MIN_ROWS])
@pytest.mark.parametrize("with_recovery", [True, False])
def test_fusion_views_match_four_slot_input(rows: int, with_recovery: bool) -> None:
    torch.manual_seed(0)
    fusion = FusionMLP(6, 4, 8)
    r = torch.rand(rows)
    has_t, has_i = r > 0.25, r < 0.75
    leaves = [torch.randn(rows, d, requires_grad=True) for d in (6, 4, 6, 4)]
    f_t, f_i, rec_t, rec_i = leaves
    recs = (rec_t, rec_i) if with_recovery else (None, None)
    grads = []
    for fast in (True, False):
        fusion.zero_grad(set_to_none=True)
        for t in leaves:
            t.grad = None
        if fast:
            out = fusion.forward_views(f_t, f_i, has_t, has_i, *recs)
        else:
            out = fusion(fusion_slots(f_t, f_i, has_t, has_i, *recs))
        out.pow(2).sum().backward()
        grads.append([out.detach()] + [t.grad for t in (*leaves, *fusion.parameters())])
    for got, want in zip(*grads, strict=True):
        if want is None or not with_recovery and got is None:
            assert got is None or not bool(got.abs().sum())
            continue
        # the two paths sum in different orders: float32 rounding grows with the magnitude of
        # what is summed, so the tolerance follows the tensor's scale (a fixed atol failed on
        # AVX-512 kernels for parameter gradients of size ~300: error 6e-5, relative 2e-7)
        assert got is not None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_fusion_views_keep_the_layer_call_for_hooks() -> None:
    """Opacus' per-sample gradients hook the first Linear: it must see the 4-slot input."""
    fusion = FusionMLP(6, 4, 8)
    seen: list[tuple[int, ...]] = []
    fusion.net[0].register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape)))
    rows = 2 * SHARED_SLOT_MIN_ROWS
    has = torch.ones(rows, dtype=torch.bool)
    fusion.forward_views(torch.randn(rows, 6), torch.randn(rows, 4), has, has, None, None)
    assert seen == [(rows, 20)]


# -- the whole step (eq. 14) and training ----------------------------------------------------
def _warm_model(seed: int) -> CrossModalNet:
    """A model after a little training, so the VLMR memory holds entries (L_mem is active)."""
    torch.manual_seed(seed)
    model = CrossModalNet(CFG)
    train_local(model, toy_set(400, seed), TrainConfig(epochs=2, batch_size=100, lr=3e-3))
    model.train()
    assert int(model.memory.count.sum()) > 0
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_step_losses_and_gradients_match_reference(dropout: float) -> None:
    base = _warm_model(0)
    data = toy_set(2 * SHARED_SLOT_MIN_ROWS + 30, 5)
    cfg = TrainConfig(modality_dropout=dropout)
    for start, size in ((0, 2 * SHARED_SLOT_MIN_ROWS), (100, 40)):  # fast and plain fusion
        idx = torch.arange(start, start + size)
        batch = (data.text[idx], data.image[idx], data.has_text[idx], data.has_image[idx])
        results = []
        for step in (_step_losses, ref_step_losses):
            model = copy.deepcopy(base)
            gen = torch.Generator().manual_seed(11)
            total, terms = step(model, *batch, data.labels[idx], cfg, gen)
            total.backward()
            grads = {k: p.grad for k, p in model.named_parameters()}
            results.append((total.detach(), terms, grads, model.memory, gen.initial_seed()))
        (t_fast, terms_fast, g_fast, mem_fast, _), (t_ref, terms_ref, g_ref, mem_ref, _) = results
        assert terms_fast.keys() == terms_ref.keys() == set(TERMS)
        assert terms_ref["mem"] > 0 and terms_ref["diff"] > 0
        assert torch.allclose(t_fast, t_ref, rtol=1e-5)
        for k in TERMS:
            assert terms_fast[k] == pytest.approx(terms_ref[k], rel=1e-5, abs=1e-7), k
        for k, want in g_ref.items():
            got = g_fast[k]
            if want is None:  # e.g. unused timestep embeddings
                assert got is None or not bool(got.abs().sum()), k
                continue
            assert got is not None, k
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), k
        for name in ("count", "cursor"):
            assert torch.equal(getattr(mem_fast, name), getattr(mem_ref, name)), name
        assert torch.allclose(mem_fast.text, mem_ref.text) and torch.allclose(
            mem_fast.image, mem_ref.image
        )


@pytest.mark.parametrize("threads", [1, 2])
def test_training_matches_reference_training(threads: int) -> None:
    """Same seeds: the loss history and the accuracy of every Table I configuration agree
    with the earlier loop (float rounding is the only difference: fused vs foreach AdamW,
    summed vs separate fusion weight blocks; measured ~1e-7 relative after 4 epochs). With 2
    threads the step runs as two concurrent halves (branch_threads)."""
    train, test = toy_set(900, 3), toy_set(400, 4, 0.0, 0.0)
    cfg = TrainConfig(epochs=4, batch_size=128, lr=3e-3, num_threads=threads)
    torch.manual_seed(2)
    fast = CrossModalNet(CFG)
    ref = copy.deepcopy(fast)
    hist_fast = train_local(fast, train, cfg).history
    hist_ref = ref_train(ref, train, cfg)
    for a, b in zip(hist_fast, hist_ref, strict=True):
        for k in TERMS:
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-6), k
    acc_fast, acc_ref = evaluate(fast, test), evaluate(ref, test)
    for name in ("both", "text_only", "image_only"):  # at most one of 400 rows differs
        assert abs(acc_fast[name]["accuracy"] - acc_ref[name]["accuracy"]) <= 1 / 400, name
    assert acc_fast["both"]["accuracy"] > 0.8  # it learned: the comparison is not vacuous


def test_two_thread_step_matches_one_thread_step() -> None:
    """Branch threads change where the halves run, not what they compute."""
    data = toy_set(300, 8, text_only=0.3, image_only=0.2)
    torch.manual_seed(3)
    one = CrossModalNet(CFG.model_copy(update={"text_only_recovery": "memory"}))
    two = copy.deepcopy(one)
    train_local(one, data, TrainConfig(epochs=3, batch_size=100, num_threads=1))
    train_local(two, data, TrainConfig(epochs=3, batch_size=100, num_threads=2))
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6), name


def test_two_thread_step_reports_a_failure_and_restores_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = CrossModalNet(CFG)
    assert model.diffusion is not None

    def broken(*_args: object, **_kwargs: object) -> torch.Tensor:
        raise RuntimeError("diffusion exploded")

    monkeypatch.setattr(model.diffusion, "loss", broken)
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="diffusion exploded"):
        train_local(model, toy_set(50, 9), TrainConfig(epochs=1, batch_size=25, num_threads=2))
    assert torch.get_num_threads() == 2
    torch.set_num_threads(before)
