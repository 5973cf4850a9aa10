"""The model side of a federated round for the client loop: load the global weights, score
them on the local holdout per Table I configuration, train locally on cached embeddings
(eq. 2-14), serialize the shareable weights, and release projections (eq. 16). A client
holding the run's Stable Diffusion checkpoint also generates its recovered image features and
fine-tunes the SD deltas each round (client/sd_recovery_step.py); the others keep
feature-space recovery and upload no SD tensors."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from crossfed.client.errors import ClientError, PrivacyBudgetExhaustedError
from crossfed.client.local_data import LocalData
from crossfed.client.local_trainer import TrainConfig, train_local
from crossfed.client.loop import ProjectionUpload, Registered, Registration
from crossfed.client.projection_release import ProjectionReleaser
from crossfed.client.resource_usage import peak_rss_bytes, reset_peak_rss
from crossfed.client.sd_recovery_step import SDRecoveryStep
from crossfed.client.update_upload import LocalUpdate
from crossfed.common.config import ClientPrivacyConfig
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.evaluation import evaluate
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.model_errors import ModelError, StableDiffusionSetupError
from crossfed.common.model.network import CrossModalNet
from crossfed.common.model.prototypes import ClassPrototypes
from crossfed.common.model.sd_trainable import SD_MODULE
from crossfed.common.round_instructions import PLAIN, RoundInstructions
from crossfed.common.wire.errors import WireError
from crossfed.common.wire.tensor_codec import decode_tensors, encode_tensors
from pydantic import ValidationError

if TYPE_CHECKING:
    from crossfed.client.private_training import DPSGDLedger, PrivateTrainResult

log = logging.getLogger(__name__)


class ModelMismatchError(ClientError):
    """The server's model (config or weights) does not fit this client's data or network."""


@dataclass(frozen=True)
class WorkerSettings:
    """Training, privacy and display settings of the worker."""

    train: TrainConfig
    privacy: ClientPrivacyConfig
    state_dir: Path | None = None
    progress: bool = False
    share_projections: bool = True
    share_calibration_stats: bool = True


def _accuracy_metrics(prefix: str, scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """Flatten evaluate() output to finite ``{prefix}_acc_{config}`` metrics."""
    out: dict[str, float] = {}
    for config, values in scores.items():
        if values.get("count", 0.0) > 0 and math.isfinite(values["accuracy"]):
            out[f"{prefix}_acc_{config}"] = values["accuracy"]
            out[f"{prefix}_f1_{config}"] = values["macro_f1"]
    return out


def trained_part(
    state: dict[str, torch.Tensor], module_samples: dict[str, int]
) -> dict[str, torch.Tensor]:
    """The upload: the shareable state without the SD deltas when this client did not
    fine-tune them (the server accepts an untrained module's keys as absent; megabytes to
    hundreds of megabytes a round for an SD-1.5-sized UNet)."""
    if module_samples.get(SD_MODULE, 0) > 0:
        return state
    prefix = SD_MODULE + "."
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


class ModelRoundWorker:
    """:class:`crossfed.client.loop.RoundWorker` over CrossModalNet and local_trainer."""

    def __init__(
        self, data: LocalData, settings: WorkerSettings, sd_step: SDRecoveryStep | None = None
    ) -> None:
        self.data = data
        self.settings = settings
        self.sd_step = sd_step
        self.sd_active = False  # the run recovers with SD and this client holds the checkpoint
        # the sets a round trains and scores on: in SD mode they carry generated f^_i
        self._train_set: EmbeddingSet = data.train
        self._holdout_set: EmbeddingSet = data.holdout
        self.model: CrossModalNet | None = None
        self.prototypes: ClassPrototypes | None = None
        self.releaser = ProjectionReleaser(settings.privacy, settings.state_dir)
        self.dp_ledger: DPSGDLedger | None = None
        if settings.privacy.dp_sgd:  # opacus is imported only by clients that use it
            from crossfed.client.private_training import DPSGDLedger

            self.dp_ledger = DPSGDLedger(settings.state_dir)
        self._global_metrics: dict[str, float] = {}
        self.last_peak_rss_bytes = 0

    def registration(self) -> Registration:
        data = self.data
        counts = data.train.counts()
        names = data.class_names or ()
        return Registration(
            modality=data.modality.proto,
            num_samples=len(data.train),
            num_paired=counts["paired"],
            num_text_only=counts["text_only"],
            num_image_only=counts["image_only"],
            class_names=names if data.labels_final else (),
            label_names=() if data.labels_final else self._held_label_names(),
            text_encoder=data.text_encoder,
            image_encoder=data.image_encoder,
            sd_checkpoint_digest=self.sd_step.digest if self.sd_step is not None else "",
        )

    def _held_label_names(self) -> tuple[str, ...]:
        """The distinct labels this client's rows hold (a manifest's own names)."""
        names = self.data.class_names or ()
        held = torch.cat([self.data.train.labels, self.data.holdout.labels]).unique().tolist()
        return tuple(names[i] for i in held)

    def on_registered(self, registered: Registered) -> None:
        self.data = self.data.for_federation(registered.class_names)
        self.releaser.adopt(registered.projection_privacy)
        if not registered.model_config_json:
            if self.model is None:
                log.warning("server sent no ModelConfig; using the defaults")
                self.model = CrossModalNet(ModelConfig())
            return
        try:
            config = ModelConfig.model_validate_json(registered.model_config_json)
        except ValidationError as exc:
            raise ModelMismatchError(f"server's ModelConfig is invalid: {exc}") from exc
        if self.model is not None and self.model.config == config:
            return  # re-registration: keep the model and its private VLMR memory
        data = self.data.train
        if (config.text_dim, config.image_dim) != (data.text_dim, data.image_dim):
            raise ModelMismatchError(
                f"server model expects text_dim={config.text_dim}, image_dim={config.image_dim} "
                f"but the local encoders give {data.text_dim}, {data.image_dim}"
            )
        top = int(torch.cat([data.labels, self.data.holdout.labels]).max())
        if top >= config.num_classes:
            raise ModelMismatchError(
                f"local label index {top} is outside the server model's {config.num_classes} "
                "classes; the federation's class list must cover every label"
            )
        self.model = CrossModalNet(config)
        self._bind_sd(config)

    def _bind_sd(self, config: ModelConfig) -> None:
        """Run SD recovery when the run asks for it and this client holds the checkpoint."""
        sd, step = config.stable_diffusion, self.sd_step
        self.sd_active = False
        self._train_set, self._holdout_set = self.data.train, self.data.holdout
        if step is None:
            if sd is not None:
                log.info("no Stable Diffusion checkpoint here: feature-space recovery")
            return
        if sd is None:
            log.warning("the server runs %s recovery: the SD checkpoint is unused", config.recovery)
            return
        try:
            step.bind(sd.settings(), sd.trainable_spec())
        except StableDiffusionSetupError as exc:
            raise ModelMismatchError(str(exc)) from exc
        self.sd_active = True

    def _require_model(self) -> CrossModalNet:
        if self.model is None:
            raise ModelMismatchError("no model: the client has not registered yet")
        return self.model

    def load_global(self, round_id: int, payload: bytes | memoryview) -> None:
        reset_peak_rss()  # this round's peak starts here
        model = self._require_model()
        view = memoryview(payload)
        try:
            # a writable buffer (the download's) is decoded in place: loading copies into the
            # model anyway, so a decoded copy would only cost time and a model's worth of memory
            model.load_shareable_state_dict(decode_tensors(view, copy=view.readonly))
        except (WireError, ModelError) as exc:
            raise ModelMismatchError(f"global model of round {round_id}: {exc}") from exc
        model.eval()
        if self.sd_active:
            self._global_metrics = {}  # scored in train(), once the features are generated
            return
        self._global_metrics = _accuracy_metrics("global", evaluate(model, self.data.holdout))

    def _generate_features(self, model: CrossModalNet, round_id: int) -> None:
        """SD mode: f^_i of every row with a caption under the global weights, then the
        global model's scores with them (what load_global does in feature mode)."""
        assert self.sd_step is not None and model.sd_recovery is not None
        try:
            self._train_set, self._holdout_set = self.sd_step.with_generated_features(
                round_id, model.sd_recovery.deltas(), self.data.train, self.data.holdout
            )
        except StableDiffusionSetupError as exc:
            raise ModelMismatchError(f"round {round_id}: {exc}") from exc
        self._global_metrics = _accuracy_metrics("global", evaluate(model, self._holdout_set))

    def train(
        self,
        round_id: int,
        local_epochs: int | None,
        instructions: RoundInstructions = PLAIN,
    ) -> LocalUpdate:
        model = self._require_model()
        base = self.settings.train
        cfg = replace(
            base,
            epochs=local_epochs or base.epochs,
            seed=base.seed + round_id,
            proximal_mu=instructions.proximal_mu,
            logit_adjustment=instructions.logit_adjustment,
        )
        dp_metrics: dict[str, float] = {}
        if self.sd_active:
            self._generate_features(model, round_id)
        if self.settings.privacy.dp_sgd:
            result = self._train_private(model, cfg)
            dp_metrics = {
                "dp_sgd_epsilon_round": result.epsilon_round,
                "dp_sgd_epsilon_total": self._dp_epsilon_total(),
                "dp_sgd_noise_multiplier": result.noise_multiplier,
            }
        else:
            result = train_local(
                model, self._train_set, cfg, self.prototypes, self.settings.progress
            )
        sd_metrics = self._finetune_sd(model, round_id, result.module_samples)
        local = _accuracy_metrics("local", evaluate(model, self._holdout_set))
        # no whole-payload SHA-256 here: an encrypted upload authenticates every chunk, and
        # prepare_upload hashes the payload itself when it has to go in clear
        payload = encode_tensors(trained_part(model.shareable_state_dict(), result.module_samples))
        self.last_peak_rss_bytes = peak_rss_bytes()
        data_metrics = {
            **{f"loss_{k}": v for k, v in result.metrics.items()},
            **sd_metrics,
            **self._global_metrics,
            **local,
        }
        # Under DP-SGD only the noised weights and epsilon leave the client: exact losses and
        # holdout accuracies are releases the DP guarantee does not cover; they stay local.
        private = self.settings.privacy.dp_sgd
        metrics = {
            **({} if private else data_metrics),
            "train_seconds": result.seconds,
            "peak_rss_mib": self.last_peak_rss_bytes / 2**20,
            **dp_metrics,
        }
        return LocalUpdate(
            payload=payload,
            num_samples=result.num_samples,
            module_samples=result.module_samples,
            metrics=metrics,
            local_metrics=data_metrics if private else {},
        )

    def _finetune_sd(
        self, model: CrossModalNet, round_id: int, module_samples: dict[str, int]
    ) -> dict[str, float]:
        """SD mode: fine-tune attn2 / text projection on the paired rows (eq. 7) and put the
        new deltas into the model; module_samples[sd_recovery] = the rows it used. Not under
        DP-SGD: the fine-tuning is not private, so its deltas must not leave the client."""
        if not self.sd_active:
            return {}
        assert self.sd_step is not None and model.sd_recovery is not None
        if self.settings.privacy.dp_sgd:
            log.info("DP-SGD: Stable Diffusion is not fine-tuned (its update would not be private)")
            return {}
        try:
            result = self.sd_step.finetune(round_id)
            if result.rows:
                model.sd_recovery.load_deltas(result.deltas)
        except StableDiffusionSetupError as exc:
            raise ModelMismatchError(f"round {round_id}: {exc}") from exc
        module_samples[SD_MODULE] = result.rows
        return result.metrics

    def calibration_stats(self, round_id: int) -> LocalUpdate:
        """Per-class statistics of the calibrated paths' last-layer inputs under the loaded
        final model (CCVR, common/model/classifier_calibration.py), on the training rows
        holding each path's modality. Under projection DP they are clipped, noised and
        accounted with the projection releases (common/privacy/calibration_dp.py); a DP-SGD
        client, a client past its epsilon budget or one that opted out sends empty
        statistics (num_samples 0)."""
        from crossfed.common.model.classifier_calibration import (
            calibration_stats,
            covered_rows,
            empty_stats,
            stats_to_tensors,
        )
        from crossfed.common.privacy.calibration_dp import (
            NOISE_METRIC,
            CalibrationDPParams,
            default_clip_norm,
            privatize_calibration_stats,
        )

        model = self._require_model()
        if not model.config.calibration_paths():
            raise ModelMismatchError(
                f"round {round_id} is a calibration round but this model has no calibration "
                "layers (model.calibrate_image_classifier and calibrate_text_classifier are off)"
            )
        started = time.perf_counter()
        privacy = self.releaser.privacy  # the own settings tightened by the server's mandate
        noised = privacy.projection_dp and privacy.noise_multiplier > 0
        metrics: dict[str, float] = {}
        if privacy.dp_sgd or not self.settings.share_calibration_stats:
            log.info("calibration round %d: empty statistics (DP-SGD or opted out)", round_id)
            stats = empty_stats(model)
        elif noised and not self.releaser.spend(privacy.noise_multiplier, "calibration stats"):
            stats = empty_stats(model)
        elif noised:
            params = CalibrationDPParams(
                default_clip_norm(model.config.hidden_dim), privacy.noise_multiplier
            )
            clipped = calibration_stats(
                model, self.data.train, clip_norm=params.clip_norm, prototypes=self.prototypes
            )
            stats = privatize_calibration_stats(clipped, params)
            metrics["calibration_dp_epsilon_total"] = self.releaser.epsilon()
            metrics[NOISE_METRIC] = params.noise_multiplier
        else:
            log.warning("projection DP is off: exact calibration statistics leave this client")
            stats = calibration_stats(model, self.data.train, prototypes=self.prototypes)
        declined = not any(stats.rows(path) for path in stats.paths)
        rows = 0 if declined else covered_rows(model, self.data.train)
        metrics["calibration_seconds"] = time.perf_counter() - started
        return LocalUpdate(
            payload=encode_tensors(stats_to_tensors(stats)), num_samples=rows, metrics=metrics
        )

    def _train_private(self, model: CrossModalNet, cfg: TrainConfig) -> PrivateTrainResult:
        """One round of DP-SGD (Opacus); epsilon is composed over rounds in the ledger."""
        from crossfed.client.private_training import DPSGDSettings, planned_round, train_private
        from crossfed.common.privacy.budget import PrivacyBudget
        from crossfed.common.privacy.dp_sgd import DPSGDError

        assert self.dp_ledger is not None
        privacy = self.settings.privacy
        dp = DPSGDSettings(
            target_epsilon=privacy.dp_sgd_target_epsilon,
            target_delta=privacy.dp_sgd_target_delta,
            max_grad_norm=privacy.dp_sgd_max_grad_norm,
        )
        if privacy.dp_sgd_epsilon_budget is not None and len(self.data.train):
            budget = PrivacyBudget(privacy.dp_sgd_epsilon_budget, privacy.dp_sgd_target_delta)
            planned = planned_round(len(self.data.train), cfg, dp)
            if self.dp_ledger.accountant.would_exceed(budget, *planned):
                raise PrivacyBudgetExhaustedError(
                    f"DP-SGD epsilon budget {budget.epsilon:g} reached: {self._dp_epsilon_total():.3g}"
                    " spent, and another round would go past it; this client stops training"
                )
        try:
            result = train_private(
                model,
                self._train_set,
                cfg,
                dp,
                self.dp_ledger,
                self.prototypes,
                self.settings.progress,
            )
        except DPSGDError as exc:
            raise ClientError(f"DP-SGD: {exc}") from exc
        log.info(
            "DP-SGD epsilon: %.3g this round, %.3g over all rounds (delta %.1e)",
            result.epsilon_round,
            self._dp_epsilon_total(),
            privacy.dp_sgd_target_delta,
        )
        return result

    def _dp_epsilon_total(self) -> float:
        assert self.dp_ledger is not None
        return self.dp_ledger.epsilon(self.settings.privacy.dp_sgd_target_delta)

    def projections(self, round_id: int) -> ProjectionUpload | None:
        if not self.settings.share_projections:
            return None
        release = self.releaser.release(self._require_model(), self.data.train)
        if release is None:
            return None
        return ProjectionUpload(
            payload=release.payload,
            epsilon_spent=release.epsilon_spent,
            mechanism=release.mechanism,
        )

    def receive_prototypes(self, round_id: int, payload: bytes) -> None:
        try:
            self.prototypes = ClassPrototypes.from_tensors(decode_tensors(payload))
        except (WireError, ModelError) as exc:
            log.warning("global prototypes of round %d unusable (%s); ignored", round_id, exc)
