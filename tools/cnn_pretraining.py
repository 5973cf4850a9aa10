"""Reproducible pretraining recipe for the default image encoder E_i (eq. 1), CPU only.

Supervised multi-task pretext on our generic procedural corpus (primitive_corpus.py): from
the mean+max pooled CNN features, linear heads predict the main object's primitive type, hue
bin, size bin and quadrant. Fresh seeded draws every step (no epochs, no overfitting). A
fixed seed, a fixed thread count and deterministic kernels make a rerun in the same
environment byte-identical (another CPU or torch build may differ in the last bits). On
export the feature mean/std are calibrated on held-out draws; the file is safetensors.

Regenerate the shipped weights (1200 steps x 192 images; measured on the shared 2-core dev
box: 3.4 min wall, 5.3 CPU-min, 0.7 GB RSS at load ~2-3; 20-44 min when it was at load 6-10):
    python -m tools.cnn_pretraining --out common/model/weights/small_cnn.safetensors
then set SMALL_CNN_WEIGHTS_SHA256 in encoders.py to the printed digest.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from crossfed.common.data.encoder_interface import ImageEncoder
from crossfed.common.data.progress_display import make_progress
from crossfed.common.model.encoders import (
    SmallCNNImageEncoder,
    SmallCNNWeights,
    save_small_cnn_weights,
)
from crossfed.common.model.model_errors import ModelError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from tools.primitive_corpus import (
    NUM_HUE_BINS,
    NUM_QUADRANTS,
    NUM_SIZE_BINS,
    PRIMITIVES,
    PrimitiveBatch,
    PrimitiveCorpusConfig,
    generate_primitives,
)

TASKS: dict[str, int] = {
    "primitive": len(PRIMITIVES),
    "hue_bin": NUM_HUE_BINS,
    "size_bin": NUM_SIZE_BINS,
    "quadrant": NUM_QUADRANTS,
}
_INPUT_MEAN = (0.5, 0.5, 0.5)
_INPUT_STD = (0.25, 0.25, 0.25)
# Independent SeedSequence streams per purpose, so probes never see training draws.
STREAM_TRAIN, STREAM_CALIBRATION, STREAM_EVAL = 0, 1, 2


class PretrainingError(ModelError):
    """The pretraining recipe was given an unusable configuration."""


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the weights; the defaults made the shipped file."""

    seed: int = 0
    steps: int = 1200
    batch_size: int = 192
    lr: float = 4e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 60
    widths: tuple[int, ...] = (24, 48, 96, 96, 96, 128)  # feature dim = 2 * widths[-1]
    strides: tuple[int, ...] = (1, 2, 2, 2, 1, 1)
    threads: int = 2
    calibration_samples: int = 4096
    eval_samples: int = 2048
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"primitive": 1.0, "hue_bin": 0.5, "size_bin": 0.5, "quadrant": 0.3}
    )
    corpus: PrimitiveCorpusConfig = field(default_factory=PrimitiveCorpusConfig)

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.strides) or not self.widths:
            raise PretrainingError(f"widths {self.widths} and strides {self.strides} must pair up")
        if min(self.steps, self.batch_size, self.threads, self.calibration_samples) <= 0:
            raise PretrainingError("steps, batch_size, threads, calibration_samples must be > 0")
        if set(self.loss_weights) != set(TASKS):
            raise PretrainingError(f"loss_weights must name exactly {sorted(TASKS)}")

    def rng(self, stream: int) -> np.random.Generator:
        """The numpy stream for one purpose (train / calibration / eval)."""
        return np.random.default_rng([self.seed, stream])


class PretextNet(nn.Module):
    """Conv+ReLU stack (the exported encoder as is), mean+max pooling, standardised features,
    one linear head per task. No BatchNorm in the stack: 3x faster to train on CPU."""

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for width, stride in zip(cfg.widths, cfg.strides):
            conv = nn.Conv2d(in_ch, width, 3, stride, padding=1)
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            assert conv.bias is not None
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            in_ch = width
        self.body = nn.Sequential(*layers)
        self.norm = nn.BatchNorm1d(2 * in_ch, affine=False)
        self.heads = nn.ModuleDict({k: nn.Linear(2 * in_ch, n) for k, n in TASKS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.norm(self.features(x))
        return {k: head(z) for k, head in self.heads.items()}


def _inputs(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> normalised float [N, 3, H, W], exactly as the encoder prepares."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(_INPUT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_INPUT_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def _targets(batch: PrimitiveBatch) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(getattr(batch, k)) for k in TASKS}


@contextmanager
def _deterministic_torch(threads: int) -> Iterator[None]:
    """Fixed thread count + deterministic kernels for the duration (restored afterwards)."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def _lr_at(cfg: PretrainConfig, step: int) -> float:
    """Linear warm-up then cosine decay to 2% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))


def train_pretext(cfg: PretrainConfig, progress: bool = True) -> PretextNet:
    """Train the pretext network on fresh corpus draws from the seed's training stream."""
    torch.manual_seed(cfg.seed)
    net = PretextNet(cfg).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    rest = [p for n, p in net.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=cfg.lr,
    )
    rng = cfg.rng(STREAM_TRAIN)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    with make_progress(progress) as bar:
        task = bar.add_task("pretraining CNN", total=cfg.steps)
        for step in range(cfg.steps):
            batch = generate_primitives(rng, cfg.batch_size, cfg.corpus)
            for group in opt.param_groups:
                group["lr"] = _lr_at(cfg, step)
            logits = net(_inputs(batch.images))
            targets = _targets(batch)
            loss = sum(
                (cfg.loss_weights[k] * loss_fn(logits[k], targets[k]) for k in TASKS),
                start=torch.zeros(()),
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.advance(task)
    return net.eval()


def _conv_weights(net: PretextNet) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    convs = [m for m in net.body if isinstance(m, nn.Conv2d)]
    out = []
    for conv in convs:
        assert conv.bias is not None
        out.append((conv.weight.detach().clone(), conv.bias.detach().clone()))
    return tuple(out)


def export_weights(cfg: PretrainConfig, net: PretextNet) -> SmallCNNWeights:
    """Conv stack + feature mean/std calibrated on held-out draws (through the encoder's path)."""
    convs = _conv_weights(net)
    dim = 2 * cfg.widths[-1]
    uncalibrated = SmallCNNWeights(
        convs=convs,
        strides=cfg.strides,
        input_size=cfg.corpus.image_size,
        input_mean=_INPUT_MEAN,
        input_std=_INPUT_STD,
        feature_mean=torch.zeros(dim),
        feature_std=torch.ones(dim),
    )
    calib = generate_primitives(cfg.rng(STREAM_CALIBRATION), cfg.calibration_samples, cfg.corpus)
    raw = _encoder_of(uncalibrated).pooled_features(calib.images)
    return replace(uncalibrated, feature_mean=raw.mean(0), feature_std=raw.std(0).clamp_min(1e-6))


def _encoder_of(weights: SmallCNNWeights) -> SmallCNNImageEncoder:
    return SmallCNNImageEncoder.from_weights(weights, identity="cnn:in-memory")


def ridge_probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    l2: float = 1.0,
) -> float:
    """Test accuracy of a closed-form ridge classifier (one-hot targets) on frozen features."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    a = torch.cat([(train_x - mean) / std, torch.ones(len(train_x), 1)], 1).double()
    b = torch.cat([(test_x - mean) / std, torch.ones(len(test_x), 1)], 1).double()
    classes = int(max(int(train_y.max()), int(test_y.max()))) + 1
    onehot = nn.functional.one_hot(train_y, classes).double()
    gram = a.T @ a + l2 * torch.eye(a.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, a.T @ onehot)
    return float(((b @ w).argmax(1) == test_y).float().mean())


def pretext_probe_scores(
    encoder: ImageEncoder, cfg: PretrainConfig, samples: int, stream: int = STREAM_EVAL
) -> dict[str, float]:
    """Ridge-probe accuracy per pretext factor on held-out corpus draws (half fit, half test)."""
    if samples < 4:
        raise PretrainingError(f"need at least 4 probe samples, got {samples}")
    batch = generate_primitives(cfg.rng(stream), samples, cfg.corpus)
    feats = encoder.encode(batch.images)
    half = samples // 2
    return {
        k: ridge_probe_accuracy(feats[:half], y[:half], feats[half:], y[half:])
        for k, y in _targets(batch).items()
    }


def pretrain(
    cfg: PretrainConfig, out: str | Path, progress: bool = True
) -> tuple[str, dict[str, float]]:
    """Run the recipe and write the weights file; returns (file SHA-256, held-out probe scores)."""
    with _deterministic_torch(cfg.threads):
        start = time.perf_counter()
        net = train_pretext(cfg, progress)
        weights = export_weights(cfg, net)
        scores = pretext_probe_scores(_encoder_of(weights), cfg, cfg.eval_samples)
        seconds = time.perf_counter() - start
    recipe = asdict(cfg)
    info = {
        "info.recipe": json.dumps(recipe, sort_keys=True),
        "info.torch": torch.__version__,
        "info.heldout_ridge_probe": json.dumps({k: round(v, 4) for k, v in scores.items()}),
    }
    digest = save_small_cnn_weights(replace(weights, info=info), out)
    scores["seconds"] = seconds
    return digest, scores


class PretrainSettings(BaseModel):
    """Validated command-line input."""

    model_config = ConfigDict(extra="forbid")

    out: Path
    seed: int = 0
    steps: int = Field(PretrainConfig.steps, gt=0)
    threads: int = Field(PretrainConfig.threads, gt=0)
    progress: bool = True


def main(argv: list[str] | None = None) -> None:
    """CLI: pretrain and write the weights file, print its SHA-256 and held-out probe scores."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps)
    parser.add_argument("--threads", type=int, default=PretrainConfig.threads)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    try:
        s = PretrainSettings(**vars(parser.parse_args(argv)))
    except ValidationError as exc:
        parser.error(str(exc))
    cfg = PretrainConfig(seed=s.seed, steps=s.steps, threads=s.threads)
    digest, scores = pretrain(cfg, s.out, s.progress)
    print(f"wrote {s.out}  sha256 {digest}")
    print(json.dumps({k: round(v, 4) for k, v in scores.items()}))


if __name__ == "__main__":
    main()
