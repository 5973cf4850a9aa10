"""What one virtual client does in a round, wherever it runs (a Ray worker or inline): load
the global shareable weights and its own VLMR memory, run the real `train_local` (eq. 2-14)
seeded by the global prototypes, and hand back its update, the module sample counts the
server weights it by, its class projections (eq. 16) and its memory for the next round.

Everything crossing a process boundary is a dict of numpy arrays (Ray stores those in its
shared-memory object store and hands workers zero-copy, read-only views), or plain dataclasses
of numbers: no tensors, no model objects.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from crossfed.client.local_trainer import TrainConfig, train_local
from crossfed.client.resource_usage import peak_rss_bytes, private_rss_bytes
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.evaluation import evaluate
from crossfed.common.model.memory import VisualLinguisticMemory
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.model_construction import model_to_load, seeded_model
from crossfed.common.model.network import CrossModalNet
from crossfed.common.model.prototypes import ClassPrototypes, compute_class_projections
from crossfed.simulation.byzantine import NO_ATTACK, Attack, poison_update

Arrays = dict[str, np.ndarray]
Scores = dict[str, dict[str, float]]
_SHARD_FIELDS = ("text", "image", "has_text", "has_image", "labels")


@dataclass(frozen=True)
class ClientTask:
    """One client's work in one round: which shard (its position in the run's client list),
    the round, local training settings (seeded per client and round), eq. 16 on or off."""

    client: int
    round_no: int
    train: TrainConfig
    share_projections: bool
    #: benchmarks/tests only: this client poisons its update (crossfed/simulation/byzantine.py)
    attack: Attack = NO_ATTACK


@dataclass
class ClientUpdate:
    """What the client sends the server: weights, |D_i| and per-module sample counts (module-
    aware eq. 15), projections (eq. 16), and metrics (loss terms, seconds, peak memory)."""

    client: int
    state: Arrays
    num_samples: int
    module_samples: dict[str, int]
    projections: Arrays | None
    metrics: dict[str, float] = field(default_factory=dict)


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over ``array`` without copying; Ray's views are read-only and nothing here
    writes to them, so torch's warning about that is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def tensors_of(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Arrays as tensors (shared memory, no copy)."""
    return {k: _tensor(v) for k, v in arrays.items()}


def arrays_of(tensors: Mapping[str, torch.Tensor]) -> Arrays:
    """Tensors as arrays (copies: the source may be a model trained again next)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in tensors.items()}


def shard_arrays(data: EmbeddingSet) -> Arrays:
    """An embedding set as the arrays a worker reads (put in the object store once)."""
    if data.recovered_image is not None:
        raise ValueError("externally recovered image features are not simulated")
    return {name: getattr(data, name).numpy() for name in _SHARD_FIELDS}


def shard_of(arrays: Mapping[str, np.ndarray]) -> EmbeddingSet:
    """Inverse of `shard_arrays` (views, no copy)."""
    return EmbeddingSet(**{name: _tensor(arrays[name]) for name in _SHARD_FIELDS})


def pack_memory(memory: VisualLinguisticMemory) -> Arrays:
    """A client's VLMR memory without its empty slots: per class the first ``count`` entries
    (a ring buffer below capacity fills slots 0..count-1), so what a client keeps between
    rounds grows with the pairs it admitted, not with ``capacity`` x classes."""
    count = memory.count
    return {
        "count": count.numpy().copy(),
        "cursor": memory.cursor.numpy().copy(),
        "text": torch.cat([memory.text[c, : int(n)] for c, n in enumerate(count)]).numpy(),
        "image": torch.cat([memory.image[c, : int(n)] for c, n in enumerate(count)]).numpy(),
    }


@torch.no_grad()
def unpack_memory(memory: VisualLinguisticMemory, packed: Mapping[str, np.ndarray] | None) -> None:
    """Restore `pack_memory`'s output into ``memory`` (None: an empty memory, a client's
    first round). Prototype entries are not kept: each round installs the global ones."""
    for buffer in memory.buffers():
        buffer.zero_()
    if packed is None:
        return
    count = _tensor(packed["count"])
    memory.count.copy_(count)
    memory.cursor.copy_(_tensor(packed["cursor"]))
    text, image = _tensor(packed["text"]), _tensor(packed["image"])
    start = 0
    for c, n in enumerate(count.tolist()):
        memory.text[c, :n] = text[start : start + n]
        memory.image[c, :n] = image[start : start + n]
        start += n


_MODELS: dict[str, CrossModalNet] = {}


def model_for(config_json: str) -> CrossModalNet:
    """This process's network for a config (built once per process, reloaded per task)."""
    model = _MODELS.get(config_json)
    if model is None:
        if len(_MODELS) >= 4:  # a worker serving many methods keeps a few networks only
            _MODELS.clear()
        model = _MODELS[config_json] = model_to_load(ModelConfig.model_validate_json(config_json))
    return model


def train_client(
    config_json: str,
    task: ClientTask,
    global_state: Mapping[str, np.ndarray],
    shard: Mapping[str, np.ndarray],
    memory: Mapping[str, np.ndarray] | None,
    prototypes: Mapping[str, np.ndarray] | None,
) -> tuple[ClientUpdate, Arrays]:
    """One round of one client (what `crossfed client` does between download and upload);
    returns the update and the client's memory for its next round."""
    model = model_for(config_json)
    model.load_shareable_state_dict(tensors_of(global_state))
    unpack_memory(model.memory, memory)
    data = shard_of(shard)
    protos = None if prototypes is None else ClassPrototypes.from_tensors(tensors_of(prototypes))
    result = train_local(model, data, task.train, protos)
    projections = (
        arrays_of(compute_class_projections(model, data).to_tensors())
        if task.share_projections
        else None
    )
    metrics = {f"loss_{k}": v for k, v in result.metrics.items()}
    metrics["train_seconds"] = result.seconds
    metrics["peak_rss_mib"] = peak_rss_bytes() / 2**20
    metrics["private_rss_mib"] = (private_rss_bytes() or 0) / 2**20
    memory = pack_memory(model.memory)
    metrics["memory_kib"] = sum(a.nbytes for a in memory.values()) / 1024
    state = {k: v.numpy() for k, v in model.shareable_state_dict().items()}  # fresh clones
    if task.attack.kind != "none":
        state = poison_update(state, global_state, task.attack)
    update = ClientUpdate(
        client=task.client,
        state=state,
        num_samples=result.num_samples,
        module_samples=dict(result.module_samples),
        projections=projections,
        metrics=metrics,
    )
    return update, memory


def client_calibration_stats(
    config_json: str,
    global_state: Mapping[str, np.ndarray],
    shard: Mapping[str, np.ndarray],
    noise_multiplier: float,
    seed: int,
    prototypes: Arrays | None = None,
) -> Arrays | None:
    """A client's CCVR statistics under the final global model served with its global
    prototypes (what it uploads in the calibration round; server/calibration_round.py),
    clipped and noised with ``noise_multiplier`` > 0 as under projection DP; None for a
    client without rows for any calibrated path."""
    from crossfed.common.model.classifier_calibration import (
        calibration_stats,
        covered_rows,
        stats_to_tensors,
    )
    from crossfed.common.privacy.calibration_dp import (
        CalibrationDPParams,
        default_clip_norm,
        privatize_calibration_stats,
    )

    data = shard_of(shard)
    model = model_for(config_json)
    if covered_rows(model, data) == 0:
        return None
    model.load_shareable_state_dict(tensors_of(global_state))
    protos = None if prototypes is None else ClassPrototypes.from_tensors(tensors_of(prototypes))
    if noise_multiplier > 0:
        params = CalibrationDPParams(default_clip_norm(model.config.hidden_dim), noise_multiplier)
        stats = calibration_stats(model, data, clip_norm=params.clip_norm, prototypes=protos)
        stats = privatize_calibration_stats(stats, params, torch.Generator().manual_seed(seed))
    else:
        stats = calibration_stats(model, data, prototypes=protos)
    return arrays_of(stats_to_tensors(stats))


def train_central(
    config_json: str,
    train: Mapping[str, np.ndarray],
    test: Mapping[str, np.ndarray],
    cfg: TrainConfig,
    seed: int,
) -> tuple[Scores, float]:
    """A central reference: one network trained on pooled rows, scored per Table I; with the
    seconds it took."""
    started = time.perf_counter()
    model = seeded_model(ModelConfig.model_validate_json(config_json), seed)
    train_local(model, shard_of(train), cfg)
    model.eval()
    return evaluate(model, shard_of(test)), time.perf_counter() - started
