"""In-process federated simulation (no gRPC): the real client trainer and the real server
aggregation, wired together round by round.

Per round every client loads the global shareable weights, keeps its own private VLMR
memory across rounds, runs `train_local` (seeded by the last global prototypes when the
projection exchange is on), and its update is folded into the server's module-aware
`StreamingFedAvg` (eq. 15) with `module_weights_of`; per-class projections (eq. 16) go
through the server's `ProjectionAggregator` and come back as global prototypes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from crossfed.client.local_trainer import TrainConfig, train_local
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.classifier_calibration import (
    MIN_SIGNAL_TO_NOISE,
    CalibrationStats,
    calibrate_image_only,
    image_only_stats,
)
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet
from crossfed.common.model.prototypes import (
    ClassPrototypes,
    apply_global_prototypes,
    compute_class_projections,
)
from crossfed.server.aggregation import StreamingFedAvg, module_weights_of
from crossfed.server.projection_exchange import ProjectionAggregator, ProjectionSpec

from quality.quality_errors import QualityBenchmarkError


@dataclass(frozen=True)
class TrainingBudget:
    """How much training a federated (or central) run gets."""

    rounds: int = 10
    local_epochs: int = 1
    central_epochs: int = 10
    batch_size: int = 256
    lr: float = 2e-3
    modality_dropout: float = 0.5  # the dropout baseline's rate
    # Ours (and its ablations) train the fusion head without modality dropout: missing
    # configurations are carried by the unimodal classifiers (eq. 9 ensemble), and dropout
    # cost the fusion head 1.7 points on paired inputs (headline, seed 0: 0.939 vs 0.956).
    ours_dropout: float = 0.0


def _memory_state(model: CrossModalNet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.memory.state_dict().items()}


def run_federation(
    model_cfg: ModelConfig,
    shards: list[EmbeddingSet],
    budget: TrainingBudget,
    seed: int,
    modality_dropout: float,
    exchange_projections: bool,
    on_round: Callable[[int], None] | None = None,
    calibration_noise: float = 0.0,
) -> CrossModalNet:
    """FedAvg over `shards` for budget.rounds rounds; returns the global model with the last
    global prototypes installed in its (otherwise empty) VLMR memory and, with
    `calibrate_image_classifier`, its image-only last layers refit by CCVR."""
    if not shards or any(len(s) == 0 for s in shards):
        raise QualityBenchmarkError("every client needs at least one training sample")
    torch.manual_seed(seed)
    global_model = CrossModalNet(model_cfg)
    global_state = global_model.shareable_state_dict()
    memories: list[dict[str, torch.Tensor] | None] = [None] * len(shards)
    prototypes: ClassPrototypes | None = None
    spec = ProjectionSpec(model_cfg.num_classes, model_cfg.text_dim, model_cfg.image_dim)
    local = CrossModalNet(model_cfg)
    for rnd in range(budget.rounds):
        fold = StreamingFedAvg(global_state, CrossModalNet.module_of)
        projections = ProjectionAggregator(spec)
        for client, shard in enumerate(shards):
            local.load_shareable_state_dict(global_state)
            memory = memories[client]
            if memory is None:
                local.memory.load_state_dict(_memory_state(CrossModalNet(model_cfg)))
            else:
                local.memory.load_state_dict(memory)
            cfg = TrainConfig(
                epochs=budget.local_epochs,
                batch_size=budget.batch_size,
                lr=budget.lr,
                seed=seed * 100_003 + rnd * 1_009 + client,
                modality_dropout=modality_dropout,
            )
            result = train_local(local, shard, cfg, prototypes)
            weights = module_weights_of(result.num_samples, result.module_samples, fold.modules)
            fold.add(local.shareable_state_dict(), weights, result.num_samples)
            memories[client] = _memory_state(local)
            if exchange_projections:
                sent = compute_class_projections(local, shard).to_tensors()
                projections.add(f"client-{client}", rnd, {k: v.double() for k, v in sent.items()})
        global_state = fold.result()
        if exchange_projections:
            prototypes = ClassPrototypes.from_tensors(projections.sums())
        if on_round is not None:
            on_round(rnd)
    global_model.load_shareable_state_dict(global_state)
    if model_cfg.calibrate_image_classifier and model_cfg.missing_fill != "zero":
        calibrate_after_training(global_model, shards, seed, calibration_noise)
    if prototypes is not None:
        apply_global_prototypes(global_model, prototypes)
    global_model.eval()
    return global_model


def calibrate_after_training(
    model: CrossModalNet, shards: list[EmbeddingSet], seed: int, noise: float = 0.0
) -> None:
    """CCVR after the last round: each client's per-class feature statistics under the final
    global model (with ``noise`` > 0 clipped and noised as under projection DP, with a seeded
    generator), summed as the server would, then the server-side refit of the image-only last
    layers (common/model/classifier_calibration.py) unless DP noise swamps the class means."""
    from crossfed.common.privacy.calibration_dp import (
        CalibrationDPParams,
        default_clip_norm,
        privatize_calibration_stats,
    )

    params = None
    if noise > 0:
        params = CalibrationDPParams(default_clip_norm(model.config.hidden_dim), noise)
    generator = torch.Generator().manual_seed(seed + 7)
    stats: CalibrationStats | None = None
    for shard in shards:
        if bool(shard.has_image.any()):
            if params is None:
                part = image_only_stats(model, shard)
            else:
                part = image_only_stats(model, shard, clip_norm=params.clip_norm)
                part = privatize_calibration_stats(part, params, generator)
            stats = part if stats is None else stats + part
    if stats is None:
        return
    if stats.signal_to_noise() >= MIN_SIGNAL_TO_NOISE:
        calibrate_image_only(model, stats, seed=seed)


def run_central(
    model_cfg: ModelConfig,
    data: EmbeddingSet,
    budget: TrainingBudget,
    seed: int,
    modality_dropout: float = 0.0,
) -> CrossModalNet:
    """One model trained on pooled data (upper bound / unimodal ceilings)."""
    torch.manual_seed(seed)
    model = CrossModalNet(model_cfg)
    cfg = TrainConfig(
        epochs=budget.central_epochs,
        batch_size=budget.batch_size,
        lr=budget.lr,
        seed=seed,
        modality_dropout=modality_dropout,
    )
    train_local(model, data, cfg)
    model.eval()
    return model
