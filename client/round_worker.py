"""The model side of a federated round for the client loop: load the global weights, score
them on the local holdout per Table I configuration, train locally on cached embeddings
(eq. 2-14), serialize the shareable weights, and release projections (eq. 16)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from crossfed.client.errors import ClientError, PrivacyBudgetExhaustedError
from crossfed.client.local_data import LocalData
from crossfed.client.local_trainer import TrainConfig, evaluate, train_local
from crossfed.client.loop import ProjectionUpload, Registered, Registration
from crossfed.client.projection_release import ProjectionReleaser
from crossfed.client.resource_usage import peak_rss_bytes, reset_peak_rss
from crossfed.client.update_upload import LocalUpdate
from crossfed.common.config import PrivacyConfig
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.model_errors import ModelError
from crossfed.common.model.network import CrossModalNet
from crossfed.common.model.prototypes import ClassPrototypes
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
    privacy: PrivacyConfig
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


class ModelRoundWorker:
    """:class:`crossfed.client.loop.RoundWorker` over CrossModalNet and local_trainer."""

    def __init__(self, data: LocalData, settings: WorkerSettings) -> None:
        self.data = data
        self.settings = settings
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
        counts = self.data.train.counts()
        return Registration(
            modality=self.data.modality.proto,
            num_samples=len(self.data.train),
            num_paired=counts["paired"],
            num_text_only=counts["text_only"],
            num_image_only=counts["image_only"],
        )

    def on_registered(self, registered: Registered) -> None:
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
        self.model = CrossModalNet(config)

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
        self._global_metrics = _accuracy_metrics("global", evaluate(model, self.data.holdout))

    def train(self, round_id: int, local_epochs: int | None) -> LocalUpdate:
        model = self._require_model()
        base = self.settings.train
        cfg = replace(base, epochs=local_epochs or base.epochs, seed=base.seed + round_id)
        dp_metrics: dict[str, float] = {}
        if self.settings.privacy.dp_sgd:
            result = self._train_private(model, cfg)
            dp_metrics = {
                "dp_sgd_epsilon_round": result.epsilon_round,
                "dp_sgd_epsilon_total": self._dp_epsilon_total(),
                "dp_sgd_noise_multiplier": result.noise_multiplier,
            }
        else:
            result = train_local(
                model, self.data.train, cfg, self.prototypes, self.settings.progress
            )
        local = _accuracy_metrics("local", evaluate(model, self.data.holdout))
        # no whole-payload SHA-256 here: an encrypted upload authenticates every chunk, and
        # prepare_upload hashes the payload itself when it has to go in clear
        payload = encode_tensors(model.shareable_state_dict())
        self.last_peak_rss_bytes = peak_rss_bytes()
        data_metrics = {
            **{f"loss_{k}": v for k, v in result.metrics.items()},
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

    def calibration_stats(self, round_id: int) -> LocalUpdate:
        """Per-class statistics of the image-only last-layer inputs under the loaded final
        model (CCVR, common/model/classifier_calibration.py), on the training rows holding an
        image. Under projection DP they are clipped, noised and accounted with the projection
        releases (common/privacy/calibration_dp.py); a DP-SGD client, a client past its
        epsilon budget or one that opted out sends empty statistics (num_samples 0)."""
        from crossfed.common.model.classifier_calibration import (
            empty_stats,
            image_only_stats,
            stats_to_tensors,
        )
        from crossfed.common.privacy.calibration_dp import (
            NOISE_METRIC,
            CalibrationDPParams,
            default_clip_norm,
            privatize_calibration_stats,
        )

        model = self._require_model()
        if model.image_calibration is None:
            raise ModelMismatchError(
                f"round {round_id} is a calibration round but this model has no calibration "
                "layers (model.calibrate_image_classifier is off)"
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
            clipped = image_only_stats(model, self.data.train, clip_norm=params.clip_norm)
            stats = privatize_calibration_stats(clipped, params)
            metrics["calibration_dp_epsilon_total"] = self.releaser.epsilon()
            metrics[NOISE_METRIC] = params.noise_multiplier
        else:
            log.warning("projection DP is off: exact calibration statistics leave this client")
            stats = image_only_stats(model, self.data.train)
        rows = int(stats.classifier.count.sum())
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
                self.data.train,
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
