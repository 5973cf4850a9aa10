"""Local (non-federated) training of CrossModalNet on cached embeddings (eq. 2-14).

`train_local` is what a client runs each round (common/model/evaluation.py scores the three
Table I configurations); `run_local_training` is the file-in/file-out entry point.
Training runs on cached f_t / f_i only (the encoders are frozen), so an epoch is a few
hundred small matrix products.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from crossfed.common.config import TRAIN_BATCH_SIZE, TRAIN_EPOCHS, TRAIN_LR, TrainSection
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.data.progress_display import make_progress
from crossfed.common.model.disentangler import orthogonality_loss
from crossfed.common.model.evaluation import check_data_fits, evaluate
from crossfed.common.model.mapper import squared_l2
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.model_errors import ModelError, ModelInputError
from crossfed.common.model.network import PRIVATE_MODULES, CrossModalNet, Recovery
from crossfed.common.model.objective import (
    TERMS,
    ProximalTerm,
    classification_loss,
    label_log_prior,
    weighted_sum,
)
from crossfed.common.model.prototypes import ClassPrototypes, apply_global_prototypes
from crossfed.common.model.sd_trainable import SD_MODULE
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn


class TrainConfigError(ModelError):
    """A TrainConfig value is out of range, or data does not fit the model."""


@dataclass
class TrainConfig:
    """Local optimisation settings (not shared with the server)."""

    epochs: int = TRAIN_EPOCHS
    batch_size: int = TRAIN_BATCH_SIZE
    lr: float = TRAIN_LR
    seed: int = 0
    weight_decay: float = 1e-4
    # Probability that a paired sample is shown to the fusion MLP with one modality hidden
    # (then recovered, or zero-filled for the baseline) -- "random modality dropout".
    modality_dropout: float = 0.0
    # DDIM steps used to recover f^_i for text-only rows while training (None: the model
    # config's diffusion_sample_steps). One step from pure noise is the denoiser's estimate of
    # E[f_i | f_t]; measured as accurate as 10-step sampling and ~1.5x faster per epoch.
    train_recovery_steps: int | None = 1
    max_grad_norm: float | None = 5.0
    num_threads: int | None = None
    # With >= 2 threads (num_threads, or torch's count when None): run the generative and
    # visual halves of eq. 14 on two threads (each with half the intra-op threads) instead of
    # splitting every operation; same gradients, no per-operation barrier.
    branch_threads: bool = True
    # FedProx mu (sent by the server with the round): mu/2 ||w - w_global||^2 over the
    # parameters this round trains is added to eq. 14; 0 = plain local training.
    proximal_mu: float = 0.0
    # FedLC tau (sent by the server with the round): every classification term of eq. 14 is
    # computed on logits + tau * log(this client's label prior); 0 = plain cross-entropy.
    logit_adjustment: float = 0.0

    @classmethod
    def from_section(cls, section: TrainSection, **runtime: Any) -> TrainConfig:
        """The one mapping from a client config's `train:` section; ``runtime`` sets what a
        config file does not (threads, seed, ...)."""
        return cls(epochs=section.epochs, batch_size=section.batch_size, lr=section.lr, **runtime)

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size <= 0:
            raise TrainConfigError(
                f"epochs must be >= 0 and batch_size > 0, got {self.epochs}, {self.batch_size}"
            )
        if not self.lr > 0:
            raise TrainConfigError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.modality_dropout <= 1.0:
            raise TrainConfigError(
                f"modality_dropout must be in [0, 1], got {self.modality_dropout}"
            )
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise TrainConfigError(f"proximal_mu must be >= 0, got {self.proximal_mu}")
        if not (math.isfinite(self.logit_adjustment) and self.logit_adjustment >= 0):
            raise TrainConfigError(f"logit_adjustment must be >= 0, got {self.logit_adjustment}")


@dataclass
class LocalTrainResult:
    """What a round of local training reports to the server."""

    module_samples: dict[str, int]
    metrics: dict[str, float]
    num_samples: int
    seconds: float = 0.0
    samples_per_second: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def _check_data(model: CrossModalNet, data: EmbeddingSet) -> None:
    try:
        check_data_fits(model, data)
    except ModelInputError as exc:
        raise TrainConfigError(str(exc)) from None


def module_samples_of(model: CrossModalNet, data: EmbeddingSet, epochs_run: int) -> dict[str, int]:
    """How many samples trained each shareable module (0 if none / zero-fill baseline)."""
    modules = {model.module_of(k) for k in model.shareable_state_dict()}
    if epochs_run == 0:
        return dict.fromkeys(sorted(modules), 0)
    n = len(data)
    paired = int((data.has_text & data.has_image).sum())
    with_image, with_text = int(data.has_image.sum()), int(data.has_text.sum())
    zero = model.config.missing_fill == "zero"
    counts = {
        "disentangler": 0 if zero else with_image,
        "mapper": 0 if zero else paired,
        "diffusion": 0 if zero else paired,
        "text_classifier": 0 if zero else with_text,
        "image_classifier": 0 if zero else with_image,
        "fusion": n,
        "head": n,
        "image_calibration": 0,  # fitted by the server (CCVR), never trained by a client
        "head_calibration": 0,
        "text_calibration": 0,
        "text_head_calibration": 0,
        SD_MODULE: 0,  # set by the SD fine-tuning of a client holding the checkpoint
    }
    return {m: counts.get(m, n) for m in sorted(modules)}


def trained_parameters(model: CrossModalNet, data: EmbeddingSet) -> list[nn.Parameter]:
    """Trainable parameters of the modules `data` trains (module_samples > 0): what DP-SGD
    updates and what FedProx's proximal term anchors."""
    counts = module_samples_of(model, data, 1)
    return [
        p
        for name, p in model.named_parameters()
        if p.requires_grad and counts.get(model.module_of(name), 1) > 0
    ]


def proximal_term(
    model: CrossModalNet, data: EmbeddingSet, cfg: TrainConfig
) -> ProximalTerm | None:
    """FedProx's term anchored at the model's current (global) values; None when mu is 0."""
    if cfg.proximal_mu == 0:
        return None
    return ProximalTerm(trained_parameters(model, data), cfg.proximal_mu)


def client_log_prior(
    model: CrossModalNet, data: EmbeddingSet, cfg: TrainConfig
) -> torch.Tensor | None:
    """The logit adjustment this round's classification terms use (None: plain)."""
    return label_log_prior(data.labels, model.config.num_classes, cfg.logit_adjustment)


def _dropout_view(
    has_t: torch.Tensor, has_i: torch.Tensor, p: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide one modality of a paired row with probability p (which one: a fair coin)."""
    if p <= 0:
        return has_t, has_i
    paired = has_t & has_i
    drop = paired & (torch.rand(has_t.shape, generator=gen) < p)
    hide_image = torch.rand(has_t.shape, generator=gen) < 0.5
    return has_t & ~(drop & ~hide_image), has_i & ~(drop & hide_image)


@dataclass
class _Batch:
    """One batch, with the row subsets the eq.-14 terms use (computed once per step)."""

    f_t: torch.Tensor
    f_i: torch.Tensor
    has_t: torch.Tensor
    has_i: torch.Tensor
    y: torch.Tensor
    view_t: torch.Tensor  # what the fusion MLP sees (after modality dropout)
    view_i: torch.Tensor
    external: torch.Tensor | None
    img_rows: torch.Tensor  # rows with an image
    pair_pos: torch.Tensor  # paired rows, as positions in img_rows
    pair_rows: torch.Tensor
    log_prior: torch.Tensor | None  # the client's label prior (logit adjustment), or None


def _batch(
    f_t: torch.Tensor,
    f_i: torch.Tensor,
    has_t: torch.Tensor,
    has_i: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    gen: torch.Generator,
    external: torch.Tensor | None,
    log_prior: torch.Tensor | None = None,
) -> _Batch:
    """Draw the modality-dropout view (the step's first random numbers) and index the rows."""
    view_t, view_i = _dropout_view(has_t, has_i, cfg.modality_dropout, gen)
    img_rows = has_i.nonzero().squeeze(1)
    pair_pos = has_t[img_rows].nonzero().squeeze(1)
    return _Batch(
        f_t=f_t,
        f_i=f_i,
        has_t=has_t,
        has_i=has_i,
        y=y,
        view_t=view_t,
        view_i=view_i,
        external=external,
        img_rows=img_rows,
        pair_pos=pair_pos,
        pair_rows=img_rows[pair_pos],
        log_prior=log_prior,
    )


@dataclass
class _Recovered:
    """What the visual half needs from the generative half (no gradient in either)."""

    image: torch.Tensor  # f^_i on text-only views (zeros elsewhere)
    mem_target: torch.Tensor | None  # VLMR estimate (eq. 10) for the rows at mem_pos
    mem_pos: torch.Tensor | None  # paired rows whose class has entries, as img_rows positions


def _generative_terms(
    model: CrossModalNet,
    b: _Batch,
    cfg: TrainConfig,
    gen: torch.Generator,
    publish: Callable[[_Recovered], None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_diff (eq. 7), the recovered f^_i of text-only views and the VLMR targets of L_mem
    (handed to `publish` as soon as they exist, before the diffusion forward, since the visual
    half waits for them; the memory is read before the visual half admits this batch), and the
    unimodal classifiers' losses. After the dropout view, only this part draws from `gen`: the
    diffusion loss's noise first, then the recovery."""
    zero = b.f_t.new_zeros(())
    f_t_pair, f_i_pair = b.f_t[b.pair_rows], b.f_i[b.pair_rows]
    drawn = (
        model.diffusion.draw_loss_noise(len(b.pair_rows), gen, b.f_i.dtype)
        if model.diffusion is not None
        else None
    )
    rec_i = torch.zeros_like(b.f_i)
    view_text_only = b.view_t & ~b.view_i
    if bool(view_text_only.any()):
        ext = None if b.external is None else b.external[view_text_only]
        rec_i[view_text_only] = model.recover_image(
            b.f_t[view_text_only], gen, ext, steps=cfg.train_recovery_steps
        )
    # VLMR estimate for the true class of each paired row (target of L_mem, eq. 11).
    mem_target = mem_pos = None
    if model.config.loss_weights.mem > 0 and len(b.pair_rows):
        y_p = b.y[b.pair_rows]
        ok = model.memory.has_entries(y_p)
        if bool(ok.all()):
            mem_pos, mem_target = b.pair_pos, model.memory.retrieve(f_t_pair, y_p)
        elif bool(ok.any()):
            mem_pos, mem_target = b.pair_pos[ok], model.memory.retrieve(f_t_pair[ok], y_p[ok])
    publish(_Recovered(rec_i, mem_target, mem_pos))
    l_diff = (
        model.diffusion.loss(f_i_pair, f_t_pair, drawn=drawn)
        if model.diffusion is not None
        else zero
    )
    # Classifier(f_t) of eq. 9 (selects the VLMR class), trained on every row with text.
    l_tc = (
        classification_loss(model.text_classifier(b.f_t[b.has_t]), b.y[b.has_t], b.log_prior)
        if bool(b.has_t.any())
        else zero
    )
    # Image-side twin of eq. 9 (used by the unimodal ensemble), on every row with an image.
    l_ic = (
        classification_loss(model.image_classifier(b.f_i[b.img_rows]), b.y[b.img_rows], b.log_prior)
        if len(b.img_rows)
        else zero
    )
    return l_diff, l_tc, l_ic


def _visual_terms(
    model: CrossModalNet, b: _Batch, recovered: Callable[[], _Recovered]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_cls (eq. 13), L_orth (eq. 3), L_align (eq. 5), L_mem (eq. 11) and the VLMR admission
    (eq. 8); `recovered()` supplies _generative_terms' results when they are needed."""
    # D_i on every row with an image (eq. 2-3); M_it + L_align on paired rows (eq. 4-5).
    f_it, f_iv = model.disentangler(b.f_i[b.img_rows])
    l_orth = orthogonality_loss(f_it, f_iv)
    hat_t_pair = model.mapper(f_it[b.pair_pos])
    l_align = squared_l2(hat_t_pair, b.f_t[b.pair_rows])
    # Fusion input with recovery for the rows whose view misses a modality (Table I); the
    # fusion layer reads a recovered row only where that modality is missing from the view.
    rec_t = torch.zeros_like(b.f_t)
    if model.config.recover_text and bool((b.view_i & ~b.view_t).any()):
        # Detached: the mapper learns only from paired rows through L_align.
        rec_t[b.pair_rows] = hat_t_pair.detach()
        only_pos = (~b.has_t[b.img_rows]).nonzero().squeeze(1)
        if len(only_pos):
            with torch.no_grad():
                rec_t[b.img_rows[only_pos]] = model.mapper(f_it[only_pos].detach())
    got = recovered()
    # VLMR L_mem (eq. 11): visual part vs. the memory's estimate for the true class.
    l_mem = b.f_t.new_zeros(())
    if got.mem_target is not None and got.mem_pos is not None:
        l_mem = squared_l2(f_iv[got.mem_pos], got.mem_target)
    logits = model.classify(b.f_t, b.f_i, b.view_t, b.view_i, Recovery(rec_t, got.image))
    l_cls = classification_loss(logits, b.y, b.log_prior)
    # Eq. 8: admit confident paired rows (seen with both modalities) into the memory; the
    # others get confidence -1, which no tau in [0, 1] admits.
    with torch.no_grad():
        conf = logits.softmax(dim=1).gather(1, b.y[:, None]).squeeze(1)
        model.memory.admit(b.f_t, b.f_i, b.y, conf.masked_fill(~(b.view_t & b.view_i), -1.0))
    return l_cls, l_orth, l_align, l_mem


def _named(
    visual: tuple[torch.Tensor, ...], generative: tuple[torch.Tensor, ...]
) -> dict[str, torch.Tensor]:
    """The eq.-14 terms of both halves by name (objective.TERMS)."""
    (l_cls, l_orth, l_align, l_mem), (l_diff, l_tc, l_ic) = visual, generative
    return {
        "cls": l_cls,
        "text_cls": l_tc,
        "image_cls": l_ic,
        "orth": l_orth,
        "align": l_align,
        "diff": l_diff,
        "mem": l_mem,
    }


def _terms(
    visual: tuple[torch.Tensor, ...], generative: tuple[torch.Tensor, ...]
) -> dict[str, float]:
    """The eq.-14 terms by name as floats, converted in one go."""
    named = _named(visual, generative)
    values = torch.stack([named[name] for name in TERMS]).detach().tolist()
    return dict(zip(TERMS, values, strict=True))


def _step_losses(
    model: CrossModalNet,
    f_t: torch.Tensor,
    f_i: torch.Tensor,
    has_t: torch.Tensor,
    has_i: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    gen: torch.Generator,
    external: torch.Tensor | None = None,
    log_prior: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 14 on one batch; returns the total and each term.

    Each module runs on the rows it needs (with gradient only where a loss uses it); fixed
    seeds draw the same random numbers in the same order as the earlier per-module step
    (tests/client/test_train_step_equivalence.py keeps it as the reference).
    """
    if model.config.missing_fill == "zero":
        view_t, view_i = _dropout_view(has_t, has_i, cfg.modality_dropout, gen)
        logits = model.classify(f_t, f_i, view_t, view_i, None)
        l_cls = classification_loss(logits, y, log_prior)
        return l_cls, {"cls": float(l_cls.detach())}
    b = _batch(f_t, f_i, has_t, has_i, y, cfg, gen, external, log_prior)
    published: list[_Recovered] = []
    generative = _generative_terms(model, b, cfg, gen, published.append)
    visual = _visual_terms(model, b, lambda: published[0])
    total = _visual_total(model, visual) + _generative_total(model, generative)
    return total, _terms(visual, generative)


def _visual_total(model: CrossModalNet, visual: tuple[torch.Tensor, ...]) -> torch.Tensor:
    l_cls, l_orth, l_align, l_mem = visual
    terms = {"cls": l_cls, "orth": l_orth, "align": l_align, "mem": l_mem}
    return weighted_sum(terms, model.config.loss_weights)


def _generative_total(model: CrossModalNet, generative: tuple[torch.Tensor, ...]) -> torch.Tensor:
    l_diff, l_tc, l_ic = generative
    return weighted_sum(
        {"text_cls": l_tc, "image_cls": l_ic, "diff": l_diff}, model.config.loss_weights
    )


def _backward_two_threads(
    model: CrossModalNet,
    pool: ThreadPoolExecutor,
    f_t: torch.Tensor,
    f_i: torch.Tensor,
    has_t: torch.Tensor,
    has_i: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    gen: torch.Generator,
    external: torch.Tensor | None = None,
    while_waiting: Callable[[], object] | None = None,
    log_prior: torch.Tensor | None = None,
) -> dict[str, float]:
    """_step_losses + backward, with the generative half (diffusion, recovery, unimodal
    classifiers) on `pool`'s thread and the visual half (D_i, M_it, VLMR, fusion) here;
    `while_waiting` runs here once the visual half is done (e.g. gathering the next batch).

    The halves train disjoint modules, so the two backward passes leave the same gradients
    as one over the total; the random numbers are drawn in _step_losses' order (dropout view
    here, before the other thread starts). No barrier per operation, unlike intra-op threads.
    """
    b = _batch(f_t, f_i, has_t, has_i, y, cfg, gen, external, log_prior)
    recovered: Future[_Recovered] = Future()

    def generative_half() -> tuple[torch.Tensor, ...]:
        try:
            terms = _generative_terms(model, b, cfg, gen, recovered.set_result)
        except BaseException as exc:
            if not recovered.done():
                recovered.set_exception(exc)
            raise
        _backward_if_trainable(_generative_total(model, terms))
        return terms

    job = pool.submit(generative_half)
    try:
        visual = _visual_terms(model, b, recovered.result)
        _backward_if_trainable(_visual_total(model, visual))
        if while_waiting is not None:
            while_waiting()
    finally:
        generative = job.result()
    return _terms(visual, generative)


_Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class _BatchGatherer:
    """The epoch's batches (text, image, masks, labels; external f^_i) gathered by step,
    optionally one step ahead (`prefetch`) while another thread still works on the last."""

    def __init__(self, data: EmbeddingSet, order: torch.Tensor, batch_size: int) -> None:
        self.data, self.order, self.batch_size = data, order, batch_size
        self._ahead: tuple[int, tuple[_Rows, torch.Tensor | None]] | None = None

    def prefetch(self, step: int) -> None:
        self._ahead = (step, self._gather(step))

    def take(self, step: int) -> tuple[_Rows, torch.Tensor | None]:
        ahead, self._ahead = self._ahead, None
        return ahead[1] if ahead is not None and ahead[0] == step else self._gather(step)

    def _gather(self, step: int) -> tuple[_Rows, torch.Tensor | None]:
        d = self.data
        idx = self.order[step * self.batch_size : (step + 1) * self.batch_size]
        rows = (d.text[idx], d.image[idx], d.has_text[idx], d.has_image[idx], d.labels[idx])
        return rows, None if d.recovered_image is None else d.recovered_image[idx]


#: Modules trained by `_generative_terms` (the other thread's half of eq. 14).
_GENERATIVE_MODULES = ("diffusion", "text_classifier", "image_classifier")


def _split_by_half(model: CrossModalNet, params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """`params` as [visual half's, generative half's] (empty groups dropped)."""
    generative = {
        id(p)
        for name, module in model.named_children()
        if name in _GENERATIVE_MODULES
        for p in module.parameters()
    }
    groups = [
        [p for p in params if id(p) not in generative],
        [p for p in params if id(p) in generative],
    ]
    return [g for g in groups if g]


def _schedule(
    opt: torch.optim.Optimizer, lr: float, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle LR over the run; constant for runs under 20 steps."""
    if total_steps >= 20:
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=total_steps, pct_start=0.1
        )
    # OneCycleLR divides by zero for some short schedules (total_steps == 10 with
    # pct_start 0.1), which a small federated client hits; too few steps to warm up anyway.
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _step: 1.0)


def _backward_if_trainable(loss: torch.Tensor) -> None:
    if loss.requires_grad:
        loss.backward()


def train_local(
    model: CrossModalNet,
    data: EmbeddingSet,
    cfg: TrainConfig,
    prototypes: ClassPrototypes | None = None,
    progress: bool = False,
) -> LocalTrainResult:
    """Train `model` in place on `data` for cfg.epochs; global prototypes seed the VLMR."""
    _check_data(model, data)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if prototypes is not None:
        apply_global_prototypes(model, prototypes)
    gen = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    prox = proximal_term(model, data, cfg)
    log_prior = client_log_prior(model, data, cfg)
    n = len(data)
    steps_per_epoch = math.ceil(n / cfg.batch_size) if n else 0
    total_steps = cfg.epochs * steps_per_epoch
    model.train()
    history: list[dict[str, float]] = []
    threads = cfg.num_threads or torch.get_num_threads()
    pool: ThreadPoolExecutor | None = None
    if cfg.branch_threads and threads >= 2 and model.config.missing_fill != "zero":
        torch.set_num_threads(threads // 2)
        pool = ThreadPoolExecutor(
            1, "crossfed-train", initializer=torch.set_num_threads, initargs=(threads // 2,)
        )
    # With two threads each half's parameters get their own optimizer, stepped on its own
    # thread (AdamW updates every parameter on its own, so the split changes no value).
    opts = [
        # fused: one kernel per parameter per step (foreach on CPU is a loop of ~8 ops each)
        torch.optim.AdamW(group, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        for group in ([params] if pool is None else _split_by_half(model, params))
    ]
    scheds = [_schedule(opt, cfg.lr, total_steps) for opt in opts]
    start = time.perf_counter()
    try:
        with make_progress(progress) as bar:
            task = bar.add_task("local training", total=cfg.epochs * n)
            for _epoch in range(cfg.epochs):
                sums: dict[str, float] = {}
                gathered = _BatchGatherer(data, torch.randperm(n, generator=gen), cfg.batch_size)
                for b in range(steps_per_epoch):
                    batch, ext = gathered.take(b)
                    idx_len = len(batch[0])
                    for opt in opts:
                        opt.zero_grad(set_to_none=True)
                    if pool is None:
                        total, terms = _step_losses(model, *batch, cfg, gen, ext, log_prior)
                        total.backward()
                    else:
                        # the next batch is gathered while the other thread finishes
                        ahead = (
                            partial(gathered.prefetch, b + 1) if b + 1 < steps_per_epoch else None
                        )
                        terms = _backward_two_threads(
                            model,
                            pool,
                            *batch,
                            cfg,
                            gen,
                            ext,
                            while_waiting=ahead,
                            log_prior=log_prior,
                        )
                    if prox is not None:
                        prox.add_gradient()
                    if cfg.max_grad_norm:
                        nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    if pool is not None and len(opts) == 2:
                        other = pool.submit(opts[1].step)
                        opts[0].step()
                        other.result()
                    else:
                        for opt in opts:
                            opt.step()
                    for sched in scheds:
                        sched.step()
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + v * idx_len
                    bar.advance(task, idx_len)
                history.append({k: v / max(n, 1) for k, v in sums.items()})
    finally:
        if pool is not None:
            pool.shutdown()
            torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    model.eval()
    metrics = dict(history[-1]) if history else {}
    return LocalTrainResult(
        module_samples=module_samples_of(model, data, cfg.epochs),
        metrics=metrics,
        num_samples=n,
        seconds=seconds,
        samples_per_second=(cfg.epochs * n / seconds) if seconds > 0 else 0.0,
        history=history,
    )


def save_model(model: CrossModalNet, path: str | Path) -> None:
    """Full local state (shareable weights and the private VLMR memory) as safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"model_config": model.config.model_dump_json()})


def load_model(path: str | Path) -> CrossModalNet:
    """Inverse of save_model (safetensors, no pickle)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TrainConfigError(f"cannot read model file {path}: {exc}") from exc
    if "model_config" not in meta:
        raise TrainConfigError(f"{path} has no model_config metadata; not a crossfed model file")
    model = CrossModalNet(ModelConfig.model_validate_json(meta["model_config"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TrainConfigError(f"{path}: missing keys {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def run_local_training(
    data: str | Path | EmbeddingSet,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    init_model: str | Path | None = None,
    output: str | Path | None = None,
    eval_data: str | Path | EmbeddingSet | None = None,
    prototypes: ClassPrototypes | None = None,
    progress: bool = True,
) -> tuple[CrossModalNet, LocalTrainResult, dict[str, dict[str, float]]]:
    """Train on an EmbeddingSet (object or .safetensors path), optionally from a saved model,
    save the result, and evaluate on `eval_data` (default: the training data)."""
    train_set = data if isinstance(data, EmbeddingSet) else EmbeddingSet.load(data)
    model = load_model(init_model) if init_model is not None else CrossModalNet(model_config)
    if model_config is not None and init_model is not None and model.config != model_config:
        raise TrainConfigError("model_config differs from the config stored in init_model")
    result = train_local(model, train_set, train_config or TrainConfig(), prototypes, progress)
    if output is not None:
        save_model(model, output)
    test_set = (
        train_set
        if eval_data is None
        else eval_data
        if isinstance(eval_data, EmbeddingSet)
        else EmbeddingSet.load(eval_data)
    )
    return model, result, evaluate(model, test_set)


__all__ = [
    "PRIVATE_MODULES",
    "LocalTrainResult",
    "TrainConfig",
    "TrainConfigError",
    "load_model",
    "run_local_training",
    "save_model",
    "train_local",
    "trained_parameters",
]
