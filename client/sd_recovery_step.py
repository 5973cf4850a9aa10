"""A client's Stable Diffusion recovery in a federated round (eq. 6-7, `stable-diffusion`).

Per round: put the global deltas into the local UNet (theta_base + delta), generate f^_i =
E_i(D_stable(x_t)) for every local row with a caption -- text-only rows (Table I) and the
training pairs (eq. 7, L_diff) -- attach them to the training and held-out sets as
`recovered_image`, and after the network's local training fine-tune attn2 / text projection on
the paired rows and hand back the new deltas for the upload. Imports no gRPC or pydantic: the
round worker drives it, and so does benchmarks/sd_recovery_gpu.py on a bare GPU machine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from crossfed.common.data.embedding_cache import EmbeddingCache
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.data.encoder_interface import ImageEncoder
from crossfed.common.data.raw_dataset import RawDataset
from crossfed.common.model.model_errors import StableDiffusionSetupError
from crossfed.common.model.sd_recovery import (
    SDRecoverySettings,
    StableDiffusionRecovery,
    resolve_device,
)
from crossfed.common.model.sd_trainable import TrainableSpec, checkpoint_digest, spec_difference

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SDClientOptions:
    """Where this client's checkpoint lives and what it runs on (not shared with the server)."""

    checkpoint_dir: Path
    device: str = "auto"  # auto: cuda when available, else this client keeps feature recovery
    gradient_checkpointing: bool = False


def usable_device(device: str) -> str | None:
    """The torch device SD recovery runs on, or None when `auto` finds no GPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else None
    return str(resolve_device(device))


@dataclass
class SDRoundResult:
    """What the fine-tuning of one round produced."""

    deltas: dict[str, torch.Tensor]
    rows: int  # paired rows it fine-tuned on (module weight of sd_recovery in FedAvg)
    metrics: dict[str, float] = field(default_factory=dict)


class SDRecoveryStep:
    """Stable Diffusion recovery for one client: generation, caching, fine-tuning, deltas."""

    def __init__(
        self,
        options: SDClientOptions,
        device: str,
        image_encoder: ImageEncoder,
        train_raw: RawDataset,
        holdout_raw: RawDataset | None,
        cache: EmbeddingCache | None,
    ) -> None:
        self.options, self.device = options, device
        self.image_encoder, self.cache = image_encoder, cache
        self.train_raw, self.holdout_raw = train_raw, holdout_raw
        self.digest = checkpoint_digest(options.checkpoint_dir)  # fails fast on a bad dir
        self.recovery: StableDiffusionRecovery | None = None
        self._generated_round: int | None = None
        self.metrics: dict[str, float] = {}

    def bind(self, settings: SDRecoverySettings, spec: TrainableSpec) -> None:
        """Load the pipeline for the run's settings; refuse a trainable spec that differs
        from this checkpoint's (the server checked the digest at registration)."""
        if self.recovery is None:
            self.recovery = StableDiffusionRecovery(
                self.options.checkpoint_dir,
                self.image_encoder,
                self.cache,
                settings,
                self.device,
                self.options.gradient_checkpointing,
            )
        self.recovery.settings = settings
        diff = spec_difference(spec, self.recovery.spec)
        if diff:
            raise StableDiffusionSetupError(
                f"checkpoint {self.options.checkpoint_dir} does not fit the run's trainable "
                f"spec: {diff}"
            )

    def _require(self) -> StableDiffusionRecovery:
        if self.recovery is None:
            raise StableDiffusionSetupError("Stable Diffusion recovery used before bind()")
        return self.recovery

    def with_generated_features(
        self,
        round_id: int,
        deltas: Mapping[str, torch.Tensor],
        train: EmbeddingSet,
        holdout: EmbeddingSet,
    ) -> tuple[EmbeddingSet, EmbeddingSet]:
        """Train / holdout sets whose rows with a caption carry f^_i = E_i(D_stable(x_t))
        generated under the global weights (eq. 6); rows without one keep zeros. Every
        `regenerate_every` rounds the features are regenerated, in between the cached ones
        of the last generation are reused."""
        rec = self._require()
        started = time.perf_counter()
        rec.load_deltas(deltas)
        every = rec.settings.regenerate_every
        reuse = self._generated_round is not None and round_id - self._generated_round < every
        parts = [(train, self.train_raw)]
        if self.holdout_raw is not None:
            parts.append((holdout, self.holdout_raw))
        captions = [raw.texts[i] for data, raw in parts for i in _text_rows(data)]
        misses_before = self.cache.stats.misses if self.cache is not None else 0
        generated_before = rec.generated_images
        feats = rec.recover_features(captions, reuse_last=reuse)
        if not reuse or rec.generated_images > generated_before:
            self._generated_round = round_id  # features of this round's weights
        out: list[EmbeddingSet] = []
        offset = 0
        for data, _raw in parts:
            rows = _text_rows(data)
            recovered = torch.zeros_like(data.image)
            recovered[torch.from_numpy(rows)] = feats[offset : offset + len(rows)]
            offset += len(rows)
            out.append(replace(data, recovered_image=recovered))
        if len(out) == 1:
            out.append(holdout)
        new_train, new_holdout = out
        paired = (new_train.has_text & new_train.has_image).nonzero().squeeze(1)
        self.metrics = {
            "sd_generate_seconds": time.perf_counter() - started,
            "sd_generated_images": float(rec.generated_images - generated_before),
            "sd_cache_hit": float(
                self.cache is not None and self.cache.stats.misses == misses_before
            ),
        }
        if len(paired):
            assert new_train.recovered_image is not None
            self.metrics["loss_sd_diff"] = rec.diff_loss(  # L_diff, eq. 7
                new_train.recovered_image[paired], new_train.image[paired]
            )
        return new_train, new_holdout

    def finetune(self, round_id: int) -> SDRoundResult:
        """Fine-tune attn2 / text projection on the paired training rows (none: no steps)."""
        rec = self._require()
        raw = self.train_raw
        paired = np.flatnonzero(raw.has_text & raw.has_image)
        steps = rec.settings.finetune_steps
        if len(paired) == 0 or steps == 0:
            return SDRoundResult(rec.deltas(), 0, dict(self.metrics))
        started = time.perf_counter()
        losses = rec.finetune(
            raw.images[paired], [raw.texts[i] for i in paired.tolist()], steps, seed=round_id
        )
        seconds = time.perf_counter() - started
        metrics = {
            **self.metrics,
            "sd_finetune_seconds": seconds,
            "sd_finetune_steps": float(len(losses)),
            "loss_sd_denoise": float(np.mean(losses)),
        }
        return SDRoundResult(rec.deltas(), len(paired), metrics)


def _text_rows(data: EmbeddingSet) -> np.ndarray:
    return np.flatnonzero(data.has_text.numpy())
