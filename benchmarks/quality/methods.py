"""The compared methods: the paper's method, the two zero-fill FedAvg baselines, the
ablations (one component off each) and the central references (paired upper bound,
unimodal ceilings). Each is a recipe: a model config, a dropout rate, exchange on/off."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from crossfed.client.local_trainer import CONFIGURATIONS, evaluate
from crossfed.common.model.model_config import ModelConfig

from quality.federated_simulation import TrainingBudget, run_central, run_federation
from quality.quality_data import FederatedData, only_modality, shards_with
from quality.quality_errors import QualityBenchmarkError

Scores = dict[str, dict[str, float]]


@dataclass(frozen=True)
class FederatedMethod:
    """A federated recipe: how the model config differs from ours, dropout, exchange."""

    name: str
    description: str
    config_update: Callable[[ModelConfig], ModelConfig]
    dropout: str  # "none", "ours" (budget.ours_dropout) or "baseline" (budget.modality_dropout)
    exchange: bool
    # Train on this modality alone (the other hidden, clients without it left out).
    only: Literal["text", "image"] | None = None
    # DP noise multiplier on the calibration statistics (0: exact), as clients apply it under
    # projection DP (common/privacy/calibration_dp.py)
    calibration_noise: float = 0.0


def _same(cfg: ModelConfig) -> ModelConfig:
    return cfg


def _zero(cfg: ModelConfig) -> ModelConfig:
    return cfg.model_copy(update={"missing_fill": "zero"})


def _weights(**kw: float) -> Callable[[ModelConfig], ModelConfig]:
    def update(cfg: ModelConfig) -> ModelConfig:
        return cfg.model_copy(update={"loss_weights": cfg.loss_weights.model_copy(update=kw)})

    return update


def _fields(**kw: object) -> Callable[[ModelConfig], ModelConfig]:
    def update(cfg: ModelConfig) -> ModelConfig:
        return cfg.model_copy(update=kw)

    return update


def _no_vlmr(cfg: ModelConfig) -> ModelConfig:
    return _weights(mem=0.0)(cfg.model_copy(update={"text_only_recovery": "diffusion"}))


FEDERATED_METHODS: dict[str, FederatedMethod] = {
    m.name: m
    for m in (
        FederatedMethod(
            "ours", "paper's method (eq. 2-16) with the changes below", _same, "ours", True
        ),
        FederatedMethod("zero_fill", "FedAvg, missing slots zero-filled", _zero, "none", False),
        FederatedMethod(
            "dropout", "FedAvg, zero-fill + modality dropout", _zero, "baseline", False
        ),
        FederatedMethod(
            "no_orth", "ours without L_orth (lambda_1=0)", _weights(orth=0.0), "ours", True
        ),
        FederatedMethod(
            "no_mapper",
            "ours, image-only rows get no f^_t (zero)",
            _fields(recover_text=False),
            "ours",
            True,
        ),
        FederatedMethod(
            "diffusion_recovery",
            "ours, text-only rows recovered by diffusion (eq. 6) instead of VLMR",
            _fields(text_only_recovery="diffusion"),
            "ours",
            True,
        ),
        FederatedMethod("no_vlmr", "ours without L_mem / memory retrieval", _no_vlmr, "ours", True),
        FederatedMethod(
            "no_exchange", "ours without projection exchange (eq. 16)", _same, "ours", False
        ),
        FederatedMethod(
            "no_unimodal_ensemble",
            "Table I as written: fusion head alone for every config, trained with the "
            "baseline's modality dropout",
            _fields(unimodal_ensemble=False, paired_ensemble=False),
            "baseline",
            True,
        ),
        FederatedMethod(
            "fed_ceiling_text",
            "federated unimodal ceiling: zero-fill FedAvg on the text rows alone, same budget",
            _zero,
            "none",
            False,
            "text",
        ),
        FederatedMethod(
            "fed_ceiling_image",
            "federated unimodal ceiling: zero-fill FedAvg on the image rows alone, same budget",
            _zero,
            "none",
            False,
            "image",
        ),
        FederatedMethod(
            "no_paired_ensemble",
            "ours, paired rows scored by the fusion head alone",
            _fields(paired_ensemble=False),
            "ours",
            True,
        ),
        FederatedMethod(
            "ours_calibrated",
            "ours + CCVR refit of the image-only last layers after the last round "
            "(opt-in: model.calibrate_image_classifier)",
            _fields(calibrate_image_classifier=True),
            "ours",
            True,
        ),
        FederatedMethod(
            "ours_calibrated_dp",
            "ours_calibrated on DP-noised statistics (sigma 1, clip sqrt(h): what clients sent "
            "under the projection-DP default before it became 5; the server's signal-to-noise "
            "guard applies)",
            _fields(calibrate_image_classifier=True),
            "ours",
            True,
            calibration_noise=1.0,
        ),
        FederatedMethod(
            "with_dropout",
            "ours with the baseline's modality dropout on paired rows",
            _same,
            "baseline",
            True,
        ),
    )
}
BASELINES = ("zero_fill", "dropout")
# What any federated method restricted to the available modality reaches with this budget:
# the part of the central ceiling that federated optimisation (client drift), not a missing
# modality, keeps out of reach.
FED_CEILINGS = ("fed_ceiling_text", "fed_ceiling_image")
ABLATIONS = (
    "with_dropout",
    "no_orth",
    "no_mapper",
    "diffusion_recovery",
    "no_vlmr",
    "no_exchange",
    "no_unimodal_ensemble",
    "no_paired_ensemble",
)
#: Additions to ours measured beside the ablations (not part of the deployed method).
VARIANTS = ("ours_calibrated", "ours_calibrated_dp")
CENTRAL_METHODS = ("central_paired", "ceiling_text", "ceiling_image")


def run_federated_method(
    name: str, base: ModelConfig, data: FederatedData, budget: TrainingBudget, seed: int
) -> Scores:
    """Train one federated method on the shards; Table I scores on the paired test split."""
    if name not in FEDERATED_METHODS:
        raise QualityBenchmarkError(f"unknown method {name!r}; known: {sorted(FEDERATED_METHODS)}")
    method = FEDERATED_METHODS[name]
    shards = data.shards if method.only is None else shards_with(data.shards, method.only)
    if not shards:  # no client holds the modality (per-client missingness at a high rate)
        nan = {"accuracy": float("nan"), "macro_f1": float("nan"), "count": 0.0}
        return {c: dict(nan) for c in CONFIGURATIONS}
    model = run_federation(
        method.config_update(base),
        shards,
        budget,
        seed,
        {
            "none": 0.0,
            "ours": budget.ours_dropout,
            "baseline": budget.modality_dropout,
        }[method.dropout],
        method.exchange,
        calibration_noise=method.calibration_noise,
    )
    return evaluate(model, data.test)


def run_central_method(
    name: str, base: ModelConfig, data: FederatedData, budget: TrainingBudget, seed: int
) -> Scores:
    """Central references: paired upper bound (full training split, both modalities) and
    unimodal ceilings (every training sample that has the modality, the other hidden)."""
    zero = _zero(base)
    if name == "central_paired":
        model = run_central(zero, data.full_train, budget, seed)
    elif name == "ceiling_text":
        model = run_central(zero, only_modality(data.train, "text"), budget, seed)
    elif name == "ceiling_image":
        model = run_central(zero, only_modality(data.train, "image"), budget, seed)
    else:
        raise QualityBenchmarkError(f"unknown central method {name!r}; known: {CENTRAL_METHODS}")
    return evaluate(model, data.test)
