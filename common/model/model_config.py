"""Hyper-parameters of the paper's network (eq. 1-14): one pydantic model shared by
server (which builds the initial global model) and clients (which train it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from crossfed.common.model.model_errors import StableDiffusionSetupError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:  # torch-backed; imported lazily so loading a config stays light
    from crossfed.common.model.sd_recovery import SDRecoverySettings
    from crossfed.common.model.sd_trainable import TrainableSpec


class LossWeights(BaseModel):
    """lambda_1..lambda_4 of eq. 14."""

    model_config = ConfigDict(extra="forbid")

    orth: float = Field(0.1, ge=0, description="lambda_1, L_orth (eq. 3)")
    align: float = Field(1.0, ge=0, description="lambda_2, L_align (eq. 5)")
    diff: float = Field(1.0, ge=0, description="lambda_3, L_diff (eq. 7)")
    mem: float = Field(0.1, ge=0, description="lambda_4, L_mem (eq. 11)")


class StableDiffusionConfig(BaseModel):
    """`recovery: stable-diffusion` (eq. 6-7): the base checkpoint every SD client holds, the
    tensors the federation fine-tunes, how images are sampled and how a round fine-tunes.
    `crossfed sd-spec CHECKPOINT_DIR` prints checkpoint_digest and trainable for a checkpoint;
    the server never loads the checkpoint (common/model/sd_trainable.py)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint_digest: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="content digest of the base diffusers checkpoint; a client registering "
        "with another one is refused",
    )
    trainable: dict[str, list[int]] = Field(
        min_length=1,
        description="name -> shape of every fine-tuned UNet tensor (attn2 + text projection); "
        "the global model carries their deltas from the base, float32",
    )
    clients_without_checkpoint: Literal["refuse", "feature"] = Field(
        "refuse",
        description="a client without the checkpoint (or without a GPU, device auto): refused "
        "at registration, or admitted with feature-space recovery (a mixed federation; "
        "FedAvg averages the SD deltas over the clients that fine-tuned them)",
    )
    num_inference_steps: int = Field(25, gt=0, le=1000, description="sampler steps per image")
    guidance_scale: float = Field(7.5, ge=1.0, le=50.0, description="classifier-free guidance")
    image_size: int | None = Field(
        None, gt=0, le=4096, description="generated image side in pixels (None: native)"
    )
    sample_seed: int = Field(0, ge=0, description="initial noise of every generated image")
    generation_batch_size: int = Field(8, gt=0, le=1024)
    finetune_steps: int = Field(
        10, ge=0, le=100_000, description="fine-tuning steps per round on a client's pairs"
    )
    finetune_batch_size: int = Field(8, gt=0, le=1024)
    finetune_lr: float = Field(1e-5, gt=0, le=1.0)
    regenerate_every: int = Field(
        1,
        gt=0,
        le=10_000,
        description="rounds between regenerations of a client's recovered features; between "
        "them the cached features of the last generation are reused (generation is the "
        "dominant cost, see README)",
    )

    @field_validator("trainable")
    @classmethod
    def _valid_spec(cls, value: dict[str, list[int]]) -> dict[str, list[int]]:
        from crossfed.common.model.sd_trainable import check_trainable_spec

        try:
            check_trainable_spec(value)
        except StableDiffusionSetupError as exc:
            raise ValueError(str(exc)) from None
        return value

    def trainable_spec(self) -> TrainableSpec:
        from crossfed.common.model.sd_trainable import check_trainable_spec

        return check_trainable_spec(self.trainable)

    def settings(self) -> SDRecoverySettings:
        """The sampler and fine-tuning settings as the recovery code takes them."""
        from crossfed.common.model.sd_recovery import SDRecoverySettings

        return SDRecoverySettings(
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            image_size=self.image_size,
            sample_seed=self.sample_seed,
            generation_batch_size=self.generation_batch_size,
            finetune_steps=self.finetune_steps,
            finetune_batch_size=self.finetune_batch_size,
            finetune_lr=self.finetune_lr,
            regenerate_every=self.regenerate_every,
        )


class ModelConfig(BaseModel):
    """Shape and behaviour of the client network; every client and the server must agree."""

    model_config = ConfigDict(extra="forbid")

    text_dim: int = Field(384, gt=0, description="d, size of f_t (all-MiniLM-L6-v2: 384)")
    image_dim: int = Field(256, gt=0, description="d', size of f_i")
    hidden_dim: int = Field(256, gt=0, description="width of disentangler/mapper/fusion MLPs")
    num_classes: int = Field(12, ge=2)
    recovery: Literal["feature", "stable-diffusion"] = Field(
        "feature",
        description="text->image recovery (eq. 6-7): feature-space diffusion, or Stable "
        "Diffusion on the clients that hold `stable_diffusion`'s checkpoint (the feature "
        "denoiser is kept as every client's fallback and for the others)",
    )
    stable_diffusion: StableDiffusionConfig | None = Field(
        None, description="required with recovery: stable-diffusion, absent otherwise"
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
    calibrate_text_classifier: bool = Field(
        False,
        description="Table I text-only path, the twin of calibrate_image_classifier: the "
        "server refits the last layers of the text classifier and of the fusion head on the "
        "text-only view (f_t, f^_i) from the clients' per-class statistics; text-only rows use "
        "those copies (`text_calibration`, `text_head_calibration`). Same calibration round, "
        'same privacy (BENCHMARKS.md, "Client drift at per-client α 0.1", for the measured '
        "effect)",
    )
    fixed_classifier: bool = Field(
        False,
        description="FedETF (Li et al., ICCV 2023; not in the paper): the last layers of both "
        "unimodal classifiers and of the fusion head are a fixed simplex equiangular tight "
        "frame over L2-normalised features with a learned scale, the same on every client, so "
        "label skew cannot pull the federated classifiers toward the clients' label mixes",
    )
    sample_seed: int = Field(0, description="seed of diffusion sampling noise at inference")

    def calibration_paths(self) -> tuple[str, ...]:
        """The inference paths whose last layers the calibration round refits (CCVR)."""
        return tuple(
            path
            for path, on in (
                ("image", self.calibrate_image_classifier),
                ("text", self.calibrate_text_classifier),
            )
            if on
        )

    memory_tau: float = Field(0.8, ge=0, le=1, description="tau of eq. 8")
    memory_capacity: int = Field(256, gt=0, description="pairs kept per class (eq. 8)")
    memory_top_k: int = Field(8, gt=0, description="K of eq. 10")
    loss_weights: LossWeights = Field(default_factory=lambda: LossWeights.model_validate({}))

    @model_validator(mode="after")
    def _sd_block_matches_recovery(self) -> ModelConfig:
        if self.recovery == "stable-diffusion" and self.stable_diffusion is None:
            raise ValueError(
                "recovery stable-diffusion needs model.stable_diffusion (checkpoint_digest and "
                "trainable: run `crossfed sd-spec CHECKPOINT_DIR`)"
            )
        if self.recovery != "stable-diffusion" and self.stable_diffusion is not None:
            raise ValueError("model.stable_diffusion is set but recovery is not stable-diffusion")
        if self.fixed_classifier and (
            self.calibrate_image_classifier or self.calibrate_text_classifier
        ):
            raise ValueError(
                "fixed_classifier and the calibrate_*_classifier flags exclude each other: "
                "the calibration refits a last layer that fixed_classifier keeps fixed"
            )
        if self.calibrate_text_classifier and self.recovery == "stable-diffusion":
            raise ValueError(
                "calibrate_text_classifier does not work with recovery stable-diffusion: "
                "text-only rows then read generated images the calibration round does not see"
            )
        if self.fixed_classifier and self.hidden_dim < self.num_classes - 1:
            raise ValueError(
                f"fixed_classifier needs hidden_dim >= num_classes - 1, got {self.hidden_dim}"
            )
        return self
