"""Local training with DP-SGD (Opacus): eq. 14 rewritten as a per-sample objective.

Opacus clips each sample's gradient, so no sample's loss may depend on another sample.
`train_local` computes every term on a sub-batch (image rows, paired rows, ...) and the
VLMR term against a memory filled from other samples; here every module runs on the
whole batch, each term is masked per row, and what DP-SGD cannot account for is left out:
- L_mem (eq. 11) and memory admission (eq. 8) are off: memory entries are other clients'
  samples' features, so one sample's gradient would carry another's data. Text-only
  recovery still uses the global prototypes and the diffusion model.
- The label-prior logit adjustment (FedLC) a strategy may ask for is off: the prior is
  counted from the private labels, so one sample would move every other sample's loss.
- Each term is averaged over the whole batch, not over the rows it applies to (a fixed
  per-sample objective); with Poisson sampling the batch size varies anyway.
Epsilon is per round (target_epsilon for cfg.epochs epochs of this round) and composed
over rounds by a persisted RDP accountant, so the total a client has spent is known.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from crossfed.client.local_trainer import (
    LocalTrainResult,
    TrainConfig,
    _check_data,
    _dropout_view,
    module_samples_of,
    proximal_term,
    trained_parameters,
)
from crossfed.common.crypto.secure_files import write_public_file
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.data.progress_display import make_progress
from crossfed.common.model.disentangler import orthogonality_per_row
from crossfed.common.model.mapper import squared_l2_per_row
from crossfed.common.model.network import CrossModalNet, Recovery
from crossfed.common.model.objective import TERMS as OBJECTIVE_TERMS
from crossfed.common.model.objective import ProximalTerm, weight_vector
from crossfed.common.model.prototypes import ClassPrototypes, apply_global_prototypes
from crossfed.common.privacy.dp_sgd import DPSGDError, make_private_training
from crossfed.common.privacy.privacy_accountant import PrivacyAccountant, PrivacyAccountantError
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

log = logging.getLogger(__name__)

LEDGER_FILE = "dp_sgd_accountant.json"
#: Eq. 14's terms without L_mem (see the module docstring).
TERMS = tuple(t for t in OBJECTIVE_TERMS if t != "mem")


@dataclass(frozen=True)
class DPSGDSettings:
    """Opacus parameters of one round of private local training."""

    target_epsilon: float
    target_delta: float
    max_grad_norm: float
    accountant: str = "rdp"


class PerSampleObjective(nn.Module):
    """Eq. 14 per row: returns a [B, len(TERMS)] tensor of unweighted per-sample terms.

    Wraps the network so Opacus' GradSampleModule sees every trainable layer called once
    on the full batch (its per-sample gradients need one batch dimension throughout).
    """

    def __init__(self, model: CrossModalNet, cfg: TrainConfig, generator: torch.Generator):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.generator = generator

    def forward(
        self,
        f_t: torch.Tensor,
        f_i: torch.Tensor,
        has_t: torch.Tensor,
        has_i: torch.Tensor,
        y: torch.Tensor,
        external: torch.Tensor | None = None,
    ) -> torch.Tensor:
        model, gen = self.model, self.generator
        view_t, view_i = _dropout_view(has_t, has_i, self.cfg.modality_dropout, gen)
        rows = f_t.new_zeros((f_t.shape[0], len(TERMS)))
        if model.config.missing_fill == "zero":
            logits = model.classify(f_t, f_i, view_t, view_i, None)
            rows[:, 0] = nn.functional.cross_entropy(logits, y, reduction="none")
            return rows
        paired = (has_t & has_i).to(f_t.dtype)
        with_image, with_text = has_i.to(f_t.dtype), has_t.to(f_t.dtype)
        f_it, f_iv = model.disentangler(f_i)  # eq. 2
        orth = orthogonality_per_row(f_it, f_iv)  # eq. 3
        hat_t = model.mapper(f_it)  # eq. 4
        align = squared_l2_per_row(hat_t, f_t)  # eq. 5
        diff = torch.zeros_like(align)
        if model.diffusion is not None:  # eq. 7
            drawn = model.diffusion.draw_loss_noise(f_i.shape[0], gen, f_i.dtype)
            diff = model.diffusion.loss_per_row(f_i, f_t, drawn=drawn)
        rec_t = torch.zeros_like(f_t)
        view_img_only = view_i & ~view_t
        if model.config.recover_text:
            rec_t = torch.where(view_img_only[:, None], hat_t.detach(), rec_t)
        rec_i = torch.zeros_like(f_i)
        view_text_only = view_t & ~view_i
        if bool(view_text_only.any()):
            ext = None if external is None else external[view_text_only]
            rec_i[view_text_only] = model.recover_image(  # no gradient, no hook
                f_t[view_text_only], gen, ext, steps=self.cfg.train_recovery_steps
            )
        logits = model.classify(f_t, f_i, view_t, view_i, Recovery(rec_t, rec_i))
        ce = nn.functional.cross_entropy
        rows[:, 0] = ce(logits, y, reduction="none")
        rows[:, 1] = ce(model.text_classifier(f_t), y, reduction="none") * with_text  # eq. 9
        rows[:, 2] = ce(model.image_classifier(f_i), y, reduction="none") * with_image
        rows[:, 3] = orth * with_image
        rows[:, 4] = align * paired
        rows[:, 5] = diff * paired
        return rows


class WeightedTerms(nn.Module):
    """Eq. 14's weighted sum of the per-sample terms, in the criterion form Opacus' ghost
    clipping expects: per-sample losses when ``reduction`` is "none", else their mean/sum."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = weights
        self.reduction = "mean"

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        per_sample = rows @ self.weights
        if self.reduction == "none":
            return per_sample
        total = per_sample.sum()
        return total / max(rows.shape[0], 1) if self.reduction == "mean" else total


class DPSGDLedger:
    """Epsilon of DP-SGD over all rounds of one client, persisted as plain JSON."""

    def __init__(self, state_dir: Path | None) -> None:
        self._path = None if state_dir is None else Path(state_dir) / LEDGER_FILE
        self.accountant = PrivacyAccountant()
        if self._path is not None and self._path.exists():
            try:
                self.accountant = PrivacyAccountant.from_json(self._path.read_text("utf-8"))
            except (OSError, PrivacyAccountantError) as exc:
                # Starting from zero would under-report what was spent: refuse instead.
                raise PrivacyAccountantError(f"cannot read {self._path}: {exc}") from exc

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add one round's optimizer steps and save before the update leaves the client."""
        if steps < 1:
            return
        self.accountant.step(noise_multiplier, sample_rate, steps)
        if self._path is not None:
            write_public_file(self._path, self.accountant.to_json().encode("utf-8"))

    def epsilon(self, delta: float) -> float:
        return self.accountant.epsilon(delta)


@dataclass
class PrivateTrainResult(LocalTrainResult):
    """LocalTrainResult plus what the round spent."""

    epsilon_round: float = 0.0
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0


def planned_round(
    num_samples: int, cfg: TrainConfig, dp: DPSGDSettings
) -> tuple[float, float, int]:
    """(noise multiplier, sample rate, steps) a round of `train_private` will spend, computed
    the way Opacus' make_private_with_epsilon does, so a budget can be checked first."""
    from opacus.accountants.utils import get_noise_multiplier

    batches = math.ceil(num_samples / min(cfg.batch_size, num_samples))
    sample_rate = 1 / batches
    sigma = get_noise_multiplier(
        target_epsilon=dp.target_epsilon,
        target_delta=dp.target_delta,
        sample_rate=sample_rate,
        epochs=cfg.epochs,
        accountant=dp.accountant,
    )
    return float(sigma), sample_rate, cfg.epochs * batches


def _private_step(optimizer: torch.optim.Optimizer, prox: ProximalTerm | None) -> None:
    """One DP-SGD step; FedProx's gradient is added after clipping and noise (it depends on
    no sample, so it is post-processing and spends no privacy)."""
    if prox is None:
        optimizer.step()
        return
    if not isinstance(optimizer, DPOptimizer):
        raise DPSGDError(f"expected Opacus' DPOptimizer, got {type(optimizer).__name__}")
    if optimizer.pre_step():  # clip, noise, scale, count the step (False: a skipped step)
        prox.add_gradient()
        optimizer.original_optimizer.step()


def _noise_only_step(optimizer: torch.optim.Optimizer, prox: ProximalTerm | None = None) -> None:
    """Step the DP optimizer on a zero gradient: it adds the noise and the accountant counts
    the step, as the mechanism requires (Opacus' ghost clipping cannot run an empty batch)."""
    optimizer.zero_grad(set_to_none=True)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    _private_step(optimizer, prox)


def train_private(
    model: CrossModalNet,
    data: EmbeddingSet,
    cfg: TrainConfig,
    dp: DPSGDSettings,
    ledger: DPSGDLedger | None = None,
    prototypes: ClassPrototypes | None = None,
    progress: bool = False,
) -> PrivateTrainResult:
    """One round of DP-SGD local training of `model` in place (see the module docstring)."""
    _check_data(model, data)
    if len(data) == 0 or cfg.epochs == 0:
        raise DPSGDError("DP-SGD needs at least one sample and one epoch")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if prototypes is not None:
        apply_global_prototypes(model, prototypes)
    gen = torch.Generator().manual_seed(cfg.seed)
    # The modules this client's data trains: the others would only receive DP noise (the
    # server gives them weight 0 anyway), and Opacus needs a per-sample gradient for every
    # parameter it updates.
    params = trained_parameters(model, data)
    prox = proximal_term(model, data, cfg)
    if cfg.logit_adjustment:
        # The prior is counted from the private labels: every sample's loss would depend on
        # the others', which DP-SGD's per-sample accounting does not cover.
        log.warning(
            "the round asks for logit adjustment (tau %g); DP-SGD trains without it: the "
            "label prior comes from the private data and its accounting cannot include it",
            cfg.logit_adjustment,
        )
    frozen = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    tensors = [data.text, data.image, data.has_text, data.has_image, data.labels]
    if data.recovered_image is not None:
        tensors.append(data.recovered_image)
    loader = DataLoader(
        TensorDataset(*tensors),
        batch_size=min(cfg.batch_size, len(data)),
        generator=torch.Generator().manual_seed(cfg.seed + 1),
    )
    objective = PerSampleObjective(model, cfg, gen)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    weights = weight_vector(TERMS, model.config.loss_weights)
    history: list[dict[str, float]] = []
    steps = 0
    model.train()
    start = time.perf_counter()
    private = None
    try:
        with warnings.catch_warnings():  # Opacus' expected warnings, this call only
            warnings.filterwarnings("ignore", message="Secure RNG turned off", module="opacus")
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            private = make_private_training(
                objective,
                opt,
                loader,
                target_epsilon=dp.target_epsilon,
                target_delta=dp.target_delta,
                epochs=cfg.epochs,
                max_grad_norm=dp.max_grad_norm,
                accountant=dp.accountant,
                criterion=WeightedTerms(weights),
            )
            assert private.criterion is not None
            # Opacus' own rate (its len() rounds 1/rate down, e.g. 92 batches for rate 1/93)
            sample_rate = float(
                getattr(private.data_loader, "sample_rate", 1 / len(private.data_loader))
            )
            with make_progress(progress) as bar:
                task = bar.add_task("local training (DP-SGD)", total=cfg.epochs * len(data))
                for _epoch in range(cfg.epochs):
                    sums = torch.zeros(len(TERMS))
                    for batch in private.data_loader:
                        size = int(batch[0].shape[0])
                        if size == 0:  # Poisson sampling drew nobody: still a (noise-only) step
                            _noise_only_step(private.optimizer, prox)
                            steps += 1
                            continue
                        rows = private.module(*batch)
                        loss = private.criterion(rows)
                        private.optimizer.zero_grad(set_to_none=True)
                        loss.backward()  # ghost clipping: norms pass, then clipped-sum pass
                        _private_step(private.optimizer, prox)
                        steps += 1
                        sums += rows.detach().sum(dim=0)
                        bar.advance(task, size)
                    history.append(
                        {name: float(v) / len(data) for name, v in zip(TERMS, sums, strict=True)}
                    )
            epsilon_round = private.epsilon()
            noise_multiplier = private.noise_multiplier
    finally:
        if private is not None:
            private.module.remove_hooks()  # type: ignore[operator]
        for p in frozen:
            p.requires_grad_(True)
        for p in model.parameters():
            if hasattr(p, "grad_sample"):
                p.grad_sample = None
        model.eval()
    seconds = time.perf_counter() - start
    if ledger is not None:
        ledger.record(noise_multiplier, sample_rate, steps)
    log.info(
        "DP-SGD round: epsilon %.3g at delta %.1e (noise multiplier %.3g, %d steps)",
        epsilon_round,
        dp.target_delta,
        noise_multiplier,
        steps,
    )
    return PrivateTrainResult(
        module_samples=module_samples_of(model, data, cfg.epochs),
        metrics=dict(history[-1]),
        num_samples=len(data),
        seconds=seconds,
        samples_per_second=cfg.epochs * len(data) / seconds if seconds > 0 else 0.0,
        history=history,
        epsilon_round=epsilon_round if math.isfinite(epsilon_round) else math.inf,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
    )
