"""The methods an experiment compares: the paper's method, the two zero-fill FedAvg baselines,
ablations (one component off each), variants, federated unimodal ceilings, and the central
references (paired upper bound, unimodal ceilings). Each federated method is a recipe: how
its model config differs from ours, which modality dropout it trains with, whether it
exchanges projections (eq. 16), and which modality its clients keep."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from crossfed.common.model.model_config import ModelConfig

Dropout = Literal["none", "ours", "baseline"]


@dataclass(frozen=True)
class FederatedMethod:
    """A federated recipe: how the model config differs from ours, dropout, exchange."""

    name: str
    description: str
    config_update: Callable[[ModelConfig], ModelConfig]
    # "none", "ours" (train.ours_dropout) or "baseline" (train.modality_dropout)
    dropout: Dropout
    exchange: bool
    # Train on this modality alone (the other hidden, clients without it left out).
    only: Literal["text", "image"] | None = None
    # DP noise multiplier on the calibration statistics (0: exact), as clients apply it under
    # projection DP (common/privacy/calibration_dp.py)
    calibration_noise: float = 0.0


def _same(cfg: ModelConfig) -> ModelConfig:
    return cfg


def zero_fill(cfg: ModelConfig) -> ModelConfig:
    """The baselines' model: missing slots zero-filled, no recovery."""
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
        FederatedMethod("zero_fill", "FedAvg, missing slots zero-filled", zero_fill, "none", False),
        FederatedMethod(
            "dropout", "FedAvg, zero-fill + modality dropout", zero_fill, "baseline", False
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
            zero_fill,
            "none",
            False,
            "text",
        ),
        FederatedMethod(
            "fed_ceiling_image",
            "federated unimodal ceiling: zero-fill FedAvg on the image rows alone, same budget",
            zero_fill,
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
            "ours_calibrated_both",
            "ours + CCVR refit of the last layers of both unimodal paths after the last round "
            "(opt-in: model.calibrate_image_classifier and calibrate_text_classifier)",
            _fields(calibrate_image_classifier=True, calibrate_text_classifier=True),
            "ours",
            True,
        ),
        FederatedMethod(
            "ours_fixed_classifier",
            "ours with FedETF's fixed simplex last layers (opt-in: model.fixed_classifier)",
            _fields(fixed_classifier=True),
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
#: Central references: the paired upper bound (every training row, both modalities) and the
#: unimodal ceilings (every training row holding the modality, the other hidden).
CENTRAL_METHODS: dict[str, str] = {
    "central_paired": "central upper bound: zero-fill model on every training row, paired",
    "ceiling_text": "central unimodal ceiling: every training row holding text, image hidden",
    "ceiling_image": "central unimodal ceiling: every training row holding an image, text hidden",
}
ALL_METHODS = (*FEDERATED_METHODS, *CENTRAL_METHODS)
