"""Classifier calibration with virtual representations (CCVR, Luo et al., NeurIPS 2021) for
the image-only inference path: the image-side unimodal classifier (eq. 9's twin,
`CrossModalNet.image_classifier`) and the fusion head (eq. 13) on the image-only view.

Not in the paper. Under Dirichlet label skew each client's local steps pull the last layers
toward its own label mix, and FedAvg of those layers keeps a bias that the shared feature
layers below them do not have (client drift is concentrated in the classifier, Luo et al.
sec. 3). CCVR fixes the last layers after federated training:

1. every client runs the final global model on its rows holding an image, as at image-only
   inference, and reports for the inputs of the two last layers (image classifier body
   output; fusion output on (f_i, f^_t)), per class, the count, the sum and the sum of outer
   products (`image_only_stats`) -- sufficient statistics, like the per-class sums of the
   projection exchange (eq. 16), no per-sample features;
2. the server adds them, which gives the exact pooled per-class means and covariances, draws
   the same number of virtual features per class from those Gaussians and refits copies of
   the two last layers on them (`calibrate_image_only`), stored in
   `CrossModalNet.image_calibration` / `head_calibration` and used for image-only rows only
   (refitting the shared image classifier layer in place cost paired inputs 0.4 points: the
   paired ensemble was tuned to the federated layer's posteriors).

Per-class statistics of two 128-wide hidden layers are 2 x C x (1 + h + h^2) floats per
client (12 classes: ~400k float64, ~3 MB), sent once after the last round; they reveal
class-conditional feature moments (like eq. 16's class means, plus second moments), not
samples. The simulator (crossfed/simulation/federation_run.py) and the coordinator's
calibration round (server/calibration_round.py, after the last training round) run this
step; on the wire the statistics travel as the tensors of `stats_to_tensors`. See
`ModelConfig.calibrate_image_classifier` for the measured effect.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.model_construction import model_to_load
from crossfed.common.model.model_errors import ModelInputError
from crossfed.common.model.network import CrossModalNet
from torch import nn


@dataclass(frozen=True)
class FeatureStats:
    """Per-class sufficient statistics of penultimate features: count [C], sum [C, h] and
    sum of outer products [C, h, h] (float64 so that adding many clients stays exact)."""

    count: torch.Tensor
    total: torch.Tensor
    outer: torch.Tensor

    def __post_init__(self) -> None:
        c = self.count.shape[0]
        if (
            self.count.dim() != 1
            or self.total.dim() != 2
            or self.total.shape[0] != c
            or self.outer.shape != (c, self.total.shape[1], self.total.shape[1])
        ):
            raise ModelInputError(
                f"feature stats shapes do not fit: count {tuple(self.count.shape)}, "
                f"sum {tuple(self.total.shape)}, outer {tuple(self.outer.shape)}"
            )

    def __add__(self, other: FeatureStats) -> FeatureStats:
        return FeatureStats(
            self.count + other.count, self.total + other.total, self.outer + other.outer
        )

    def gaussians(self, ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(classes with >= 2 samples, their means [K, h], covariances [K, h, h])."""
        present = (self.count >= 2).nonzero().squeeze(1)
        n = self.count[present][:, None]
        mean = self.total[present] / n
        cov = self.outer[present] / n[:, :, None] - mean[:, :, None] * mean[:, None, :]
        cov = cov * (n / (n - 1))[:, :, None]  # unbiased, as torch.cov
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype)
        cov = 0.5 * (cov + cov.transpose(1, 2))
        _, not_psd = torch.linalg.cholesky_ex(cov + ridge * eye)
        if bool(not_psd.any()):  # DP noise (common/privacy/calibration_dp.py): nearest PSD
            values, vectors = torch.linalg.eigh(cov)
            cov = vectors @ torch.diag_embed(values.clamp_min(0.0)) @ vectors.transpose(1, 2)
        return present, mean, cov + ridge * eye


@dataclass(frozen=True)
class NoiseVariance:
    """Per-coordinate variance of the DP noise in a count, a sum and a sum of outer products
    (0: exact statistics). Independent noise adds up over clients like the statistics, so
    the server knows how noisy the pooled statistics are (common/privacy/calibration_dp.py)."""

    count: float = 0.0
    total: float = 0.0
    outer: float = 0.0

    def __add__(self, other: NoiseVariance) -> NoiseVariance:
        return NoiseVariance(
            self.count + other.count, self.total + other.total, self.outer + other.outer
        )

    @property
    def exact(self) -> bool:
        return self.count == self.total == self.outer == 0.0


@dataclass(frozen=True)
class CalibrationStats:
    """What a client sends after the last round: per-class stats of the two image-only
    last-layer inputs (the image classifier's body output and the fusion output on the
    image-only view (f_i, f^_t)), and the variance of the DP noise in them, if any."""

    classifier: FeatureStats
    head: FeatureStats
    noise: NoiseVariance = NoiseVariance()

    def __add__(self, other: CalibrationStats) -> CalibrationStats:
        return CalibrationStats(
            self.classifier + other.classifier, self.head + other.head, self.noise + other.noise
        )

    def signal_to_noise(self) -> float:
        """The worse `signal_to_noise` of the two parts (inf for exact statistics)."""
        return min(
            signal_to_noise(self.classifier, self.noise), signal_to_noise(self.head, self.noise)
        )


#: Least bias-corrected ratio of the class means' spread to the DP noise in them for which
#: the server fits: below it the virtual features mostly describe noise.
MIN_SIGNAL_TO_NOISE = 1.0


def signal_to_noise(stats: FeatureStats, noise: NoiseVariance) -> float:
    """Spread of the per-class means around the overall mean (count-weighted, minus the noise
    it contains in expectation) over the expected noise energy in the means; inf when exact.
    A mean over n_c rows carries noise of variance noise.total / n_c^2 per coordinate."""
    present = stats.count >= 2
    n = stats.count[present]
    if len(n) == 0 or noise.total == 0.0:
        return math.inf
    h = stats.total.shape[1]
    means = stats.total[present] / n[:, None]
    grand = stats.total[present].sum(0) / n.sum()
    spread = float((n * (means - grand).pow(2).sum(1)).sum() / n.sum())
    noise_energy = h * noise.total * float((1.0 / n).sum()) / float(n.sum())
    return (spread - noise_energy) / noise_energy


def _body_and_last(classifier: nn.Sequential) -> tuple[nn.Module, nn.Linear]:
    last = classifier[-1]
    if not isinstance(last, nn.Linear):
        raise ModelInputError(f"classifier must end in nn.Linear, got {type(last).__name__}")
    return classifier[:-1], last


def class_stats(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> FeatureStats:
    """Per-class count, sum and sum of outer products of `feats` [N, h] (float64)."""
    f = feats.to(torch.float64)
    h = f.shape[1]
    count = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    total = torch.zeros(num_classes, h, dtype=torch.float64).index_add_(0, labels, f)
    outer = torch.zeros(num_classes, h, h, dtype=torch.float64)
    outer.index_add_(0, labels, f[:, :, None] * f[:, None, :])
    return FeatureStats(count, total, outer)


def image_only_hidden(model: CrossModalNet, f_i: torch.Tensor) -> torch.Tensor:
    """Fusion output (the head's input) for image-only rows, as `CrossModalNet.forward`
    builds it: text slot empty, recovered slot f^_t = M_it(f_i->t) (zero without
    recover_text)."""
    n = len(f_i)
    f_t = f_i.new_zeros(n, model.config.text_dim)
    rec_t = model.recover_text(f_i) if model.config.recover_text else f_t
    has_i = torch.ones(n, dtype=torch.bool)
    return model.fusion.forward_views(f_t, f_i, ~has_i, has_i, rec_t, torch.zeros_like(f_i))


def _clipped(feats: torch.Tensor, clip_norm: float | None) -> torch.Tensor:
    if clip_norm is None:
        return feats
    norms = feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return feats * torch.clamp(clip_norm / norms, max=1.0)


def empty_stats(model: CrossModalNet) -> CalibrationStats:
    """All-zero statistics of the right shapes (what a client that declines sends)."""
    c, no_rows = model.config.num_classes, torch.zeros(0, dtype=torch.long)
    last = _body_and_last(model.image_classifier)[1]
    return CalibrationStats(
        class_stats(torch.zeros(0, last.in_features), no_rows, c),
        class_stats(torch.zeros(0, model.head.in_features), no_rows, c),
    )


@torch.no_grad()
def image_only_stats(
    model: CrossModalNet,
    data: EmbeddingSet,
    batch_size: int = 4096,
    clip_norm: float | None = None,
) -> CalibrationStats:
    """Client side: per-class stats of both image-only last-layer inputs on the rows of
    `data` holding an image (their text, if any, hidden as at image-only inference); with
    ``clip_norm``, each feature vector is first scaled to L2 <= clip_norm (bounded
    sensitivity for the DP mechanism of common/privacy/calibration_dp.py)."""
    body, _ = _body_and_last(model.image_classifier)
    c = model.config.num_classes
    rows = data.has_image.nonzero().squeeze(1)
    out = empty_stats(model)
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(rows), batch_size):
            idx = rows[s : s + batch_size]
            f_i, y = data.image[idx], data.labels[idx]
            body_out = _clipped(body(f_i), clip_norm)
            hidden = _clipped(image_only_hidden(model, f_i), clip_norm)
            out = out + CalibrationStats(class_stats(body_out, y, c), class_stats(hidden, y, c))
    finally:
        model.train(was_training)
    return out


def refit_linear(
    last: nn.Linear,
    stats: FeatureStats,
    samples_per_class: int = 2000,
    steps: int = 200,
    lr: float = 1e-2,
    seed: int = 0,
) -> nn.Linear | None:
    """A copy of `last` refit on `samples_per_class` virtual features per class drawn from
    the class Gaussians of `stats` (full-batch Adam from `last`'s weights; equal class counts,
    as CCVR). Classes with fewer than 2 samples are left out; None if fewer than 2 remain."""
    present, mean, cov = stats.gaussians()
    if len(present) < 2:
        return None
    gen = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(cov)
    noise = torch.randn(len(present), samples_per_class, mean.shape[1], generator=gen)
    virtual = mean[:, None, :] + torch.einsum("khj,knj->knh", chol, noise.to(cov.dtype))
    feats = virtual.reshape(-1, mean.shape[1]).to(last.weight.dtype)
    labels = present.repeat_interleave(samples_per_class)
    layer = copy.deepcopy(last).requires_grad_(True)  # no draw from torch's generator
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(layer(feats), labels).backward()
            opt.step()
    return layer


def calibrate_image_only(
    model: CrossModalNet,
    stats: CalibrationStats,
    samples_per_class: int = 2000,
    steps: int = 200,
    lr: float = 1e-2,
    seed: int = 0,
) -> bool:
    """Server side: fit `model.image_calibration` (from image_classifier[-1]) and
    `model.head_calibration` (from head) on virtual features (`refit_linear`) and mark them
    ready. Returns False (nothing changed) when fewer than two classes are present."""
    targets = (
        (model.image_calibration, _body_and_last(model.image_classifier)[1], stats.classifier),
        (model.head_calibration, model.head, stats.head),
    )
    fitted = []
    for cal, last, part in targets:
        if cal is None:
            raise ModelInputError(
                "model has no calibration layers (calibrate_image_classifier=False)"
            )
        layer = refit_linear(last, part, samples_per_class, steps, lr, seed)
        if layer is None:
            return False
        fitted.append((cal, layer))
    with torch.no_grad():
        for cal, layer in fitted:
            cal.weight.copy_(layer.weight)
            cal.bias.copy_(layer.bias)
            cal.ready.fill_(True)
    return True


_PARTS = ("classifier", "head")
_FIELDS = ("count", "sum", "outer")


def stats_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Wire names and shapes of a client's calibration statistics (all float64): for each
    last layer ("classifier", "head"), ``<part>.count`` [C], ``.sum`` [C, h], ``.outer``
    [C, h, h], with h the width both last layers read (`CrossModalNet` hidden_dim)."""
    c, h = config.num_classes, config.hidden_dim
    shapes = {"count": (c,), "sum": (c, h), "outer": (c, h, h)}
    out = {f"{part}.{name}": shapes[name] for part in _PARTS for name in _FIELDS}
    return {**out, **{f"noise.{name}_var": () for name in _FIELDS}}


def stats_to_tensors(stats: CalibrationStats) -> dict[str, torch.Tensor]:
    """The tensors a client uploads in the calibration round (names of `stats_shapes`)."""
    out: dict[str, torch.Tensor] = {}
    for part, fs in zip(_PARTS, (stats.classifier, stats.head), strict=True):
        for name, tensor in zip(_FIELDS, (fs.count, fs.total, fs.outer), strict=True):
            out[f"{part}.{name}"] = tensor.to(torch.float64).contiguous()
    noise = stats.noise
    for name, value in zip(_FIELDS, (noise.count, noise.total, noise.outer), strict=True):
        out[f"noise.{name}_var"] = torch.tensor(value, dtype=torch.float64)
    return out


def stats_from_tensors(tensors: Mapping[str, torch.Tensor]) -> CalibrationStats:
    """Inverse of `stats_to_tensors` (shapes checked by `FeatureStats`)."""
    names = [f"{p}.{n}" for p in _PARTS for n in _FIELDS] + [f"noise.{n}_var" for n in _FIELDS]
    missing = sorted(name for name in names if name not in tensors)
    if missing:
        raise ModelInputError(f"calibration statistics lack {', '.join(missing)}")
    parts = [
        FeatureStats(*(tensors[f"{part}.{name}"].to(torch.float64) for name in _FIELDS))
        for part in _PARTS
    ]
    noise = NoiseVariance(*(float(tensors[f"noise.{name}_var"]) for name in _FIELDS))
    return CalibrationStats(parts[0], parts[1], noise)


def check_client_stats(tensors: Mapping[str, torch.Tensor], num_samples: int) -> None:
    """Plausibility of one client's statistics before the server adds them: whole,
    non-negative counts that add up to the ``num_samples`` it declared (<= what it
    registered, so one client cannot outweigh the rest) in both parts, and sums of outer
    products with a non-negative diagonal. Raises `ModelInputError` naming the problem."""
    stats = stats_from_tensors(tensors)
    noise = stats.noise
    if min(noise.count, noise.total, noise.outer) < 0:
        raise ModelInputError("noise variances must be >= 0")
    for part, fs in zip(_PARTS, (stats.classifier, stats.head), strict=True):
        count = fs.count
        if bool((count < 0).any()) or not torch.equal(count, count.round()):
            raise ModelInputError(f"{part}.count must hold whole numbers >= 0")
        if int(count.sum()) != num_samples:
            raise ModelInputError(
                f"{part}.count adds up to {int(count.sum())} rows but the upload declares "
                f"num_samples={num_samples}"
            )
        if bool((fs.outer.diagonal(dim1=1, dim2=2) < 0).any()):
            raise ModelInputError(f"{part}.outer has a negative diagonal (not a sum of squares)")
        empty = count == 0
        if bool(fs.total[empty].any()) or bool(fs.outer[empty].any()):
            raise ModelInputError(f"{part}: a class with count 0 has non-zero sums")


def calibrated_state(
    config: ModelConfig,
    global_state: Mapping[str, torch.Tensor],
    stats: CalibrationStats,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """Server side of the calibration round: (the global shareable state with its calibration
    layers fitted on ``stats``, what was done), or (None, why not) when fewer than two
    classes have statistics or DP noise swamps them (`MIN_SIGNAL_TO_NOISE`)."""
    snr = stats.signal_to_noise()
    noisy = "" if math.isinf(snr) else f" (DP-noised statistics, signal-to-noise {snr:.3g})"
    if snr < MIN_SIGNAL_TO_NOISE:
        return None, f"DP noise swamps the class statistics{noisy}; left uncalibrated"
    model = model_to_load(config)
    model.load_shareable_state_dict(global_state)
    if not calibrate_image_only(model, stats, seed=seed):
        return None, "fewer than two classes have statistics; left uncalibrated"
    return model.shareable_state_dict(), f"image-only last layers fitted{noisy}"
