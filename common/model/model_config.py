"""Hyper-parameters of the paper's network (eq. 1-14): one pydantic model shared by
server (which builds the initial global model) and clients (which train it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class LossWeights(BaseModel):
    """lambda_1..lambda_4 of eq. 14."""

    model_config = ConfigDict(extra="forbid")

    orth: float = Field(0.1, ge=0, description="lambda_1, L_orth (eq. 3)")
    align: float = Field(1.0, ge=0, description="lambda_2, L_align (eq. 5)")
    diff: float = Field(1.0, ge=0, description="lambda_3, L_diff (eq. 7)")
    mem: float = Field(0.1, ge=0, description="lambda_4, L_mem (eq. 11)")


class ModelConfig(BaseModel):
    """Shape and behaviour of the client network; every client and the server must agree."""

    model_config = ConfigDict(extra="forbid")

    text_dim: int = Field(384, gt=0, description="d, size of f_t (all-MiniLM-L6-v2: 384)")
    image_dim: int = Field(256, gt=0, description="d', size of f_i")
    hidden_dim: int = Field(256, gt=0, description="width of disentangler/mapper/fusion MLPs")
    num_classes: int = Field(12, ge=2)
    recovery: Literal["feature", "stable-diffusion"] = Field(
        "feature", description="text->image recovery (eq. 6-7): feature-space diffusion or SD"
    )
    missing_fill: Literal["recover", "zero"] = Field(
        "recover", description="'zero' is the zero-fill baseline, never the default"
    )
    diffusion_train_steps: int = Field(100, gt=0, description="DDPM timesteps")
    diffusion_sample_steps: int = Field(
        1,
        gt=0,
        description="DDIM steps at inference. 1 (default): the x0-predicting denoiser's "
        "posterior-mean estimate E[f_i | f_t], the same recovery the fusion MLP sees in "
        "training (TrainConfig.train_recovery_steps); more steps draw a sample instead",
    )
    text_only_recovery: Literal["diffusion", "memory"] = Field(
        "memory",
        description="Table I text-only path in feature mode: VLMR (default; memory entries "
        "of the eq.-9 class, else diffusion) or diffusion. VLMR hands the fusion head real "
        "image features of the predicted class; the diffusion estimate E[f_i | f_t] is a "
        "blurred mean the image classifier scores at chance. Federated headline, 3 seeds: "
        "text-only +0.7 points (random-CNN run: +0.5)",
    )
    recover_text: bool = Field(
        True,
        description="Table I image-only path: f^_t = M_it(f_i->t); False leaves the recovered "
        "text slot zero (the benchmark's no-mapper ablation)",
    )
    unimodal_ensemble: bool = Field(
        True,
        description="Table I missing configurations: add log-probabilities of the unimodal "
        "classifier of the available modality (eq. 9: Classifier(f_t); its image-side twin "
        "Classifier(f_i)) to the fusion head's; see CrossModalNet.forward",
    )
    paired_ensemble: bool = Field(
        True,
        description="Table I paired configuration: add both unimodal classifiers' "
        "log-probabilities to the fusion head's. They learn from every row holding their "
        "modality, the fusion head's paired path only from paired rows, which per-client "
        "missingness makes rare (BENCHMARKS.md, quality section). Needs unimodal_ensemble",
    )
    calibrate_image_classifier: bool = Field(
        False,
        description="Table I image-only path: after federated training the server refits the "
        "last layers of the image classifier and of the fusion head on virtual features drawn "
        "from the clients' per-class feature statistics (CCVR, Luo et al. 2021; not in the "
        "paper); image-only rows use those copies (`CrossModalNet.image_calibration`, "
        "`head_calibration`), paired and text-only rows the federated layers. Label skew "
        "biases the FedAvg'd last layers toward the clients' label mixes. Federated headline, "
        "3 seeds: image-only 0.745 -> 0.763, text-only and paired unchanged; see "
        "common/model/classifier_calibration.py. The coordinator runs it as a calibration "
        "round after the last training round (server/calibration_round.py). Off by default: "
        "clients release per-class feature moments, Gaussian-noised under projection DP "
        "(common/privacy/calibration_dp.py), which keeps about 40% of the gain (headline "
        "image-only 0.752 at sigma 1) and none on small clients",
    )
    sample_seed: int = Field(0, description="seed of diffusion sampling noise at inference")
    memory_tau: float = Field(0.8, ge=0, le=1, description="tau of eq. 8")
    memory_capacity: int = Field(256, gt=0, description="pairs kept per class (eq. 8)")
    memory_top_k: int = Field(8, gt=0, description="K of eq. 10")
    loss_weights: LossWeights = Field(default_factory=lambda: LossWeights.model_validate({}))
