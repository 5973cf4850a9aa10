"""Classifier calibration with virtual representations (CCVR, Luo et al., NeurIPS 2021) for
the two unimodal inference paths: on the image-only path the image-side unimodal classifier
(eq. 9's twin, `CrossModalNet.image_classifier`) and the fusion head (eq. 13) on the
image-only view (`ModelConfig.calibrate_image_classifier`); on the text-only path the text
classifier (eq. 9) and the fusion head on the text-only view (`calibrate_text_classifier`).

Not in the paper. Under Dirichlet label skew each client's local steps pull the last layers
toward its own label mix, and FedAvg of those layers keeps a bias that the shared feature
layers below them do not have (client drift is concentrated in the classifier, Luo et al.
sec. 3). CCVR fixes the last layers after federated training:

1. every client runs the final global model on its rows holding the path's modality, as at
   inference on that path, and reports for the inputs of the path's two last layers
   (unimodal classifier body output; fusion output on the path's view), per class, the
   count, the sum and the sum of outer products (`calibration_stats`) -- sufficient
   statistics, like the per-class sums of the projection exchange (eq. 16), no per-sample
   features;
2. the server adds them, which gives the exact pooled per-class means and covariances, draws
   the same number of virtual features per class from those Gaussians and refits copies of
   the two last layers on them (`calibrate_last_layers`), stored in
   `CrossModalNet.image_calibration` / `head_calibration` (text path: `text_calibration` /
   `text_head_calibration`) and used for that path's rows only (refitting the shared image
   classifier layer in place cost paired inputs 0.4 points: the paired ensemble was tuned to
   the federated layer's posteriors).

Per-class statistics of two 128-wide hidden layers are 2 x C x (1 + h + h^2) floats per path
per client (12 classes: ~400k float64, ~3 MB), sent once after the last round; they reveal
class-conditional feature moments (like eq. 16's class means, plus second moments), not
samples. The simulator (crossfed/simulation/federation_run.py) and the coordinator's
calibration round (server/calibration_round.py, after the last training round) run this
step; on the wire the statistics travel as the tensors of `stats_to_tensors`. See
`ModelConfig.calibrate_image_classifier` for the measured effect.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.model_construction import model_to_load
from crossfed.common.model.model_errors import ModelInputError
from crossfed.common.model.network import CalibratedLayer, CrossModalNet
from crossfed.common.model.prototypes import ClassPrototypes, apply_global_prototypes
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


#: Each calibrated inference path and its two parts: the statistics of the inputs of the
#: unimodal classifier's last layer, and of the head's input on that path's view.
PATH_PARTS: dict[str, tuple[str, str]] = {
    "image": ("classifier", "head"),
    "text": ("text_classifier", "text_head"),
}


@dataclass(frozen=True)
class CalibrationStats:
    """What a client sends after the last round: per-class stats of each calibrated path's two
    last-layer inputs (``parts``, named by `PATH_PARTS`), and the variance of the DP noise in
    them, if any. Image path: the image classifier's body output and the fusion output on the
    image-only view (f_i, f^_t); text path: the text classifier's body output and the fusion
    output on the text-only view (f_t, f^_i)."""

    parts: Mapping[str, FeatureStats]
    noise: NoiseVariance = NoiseVariance()

    def __add__(self, other: CalibrationStats) -> CalibrationStats:
        if set(self.parts) != set(other.parts):
            raise ModelInputError(
                f"calibration statistics of different paths: {sorted(self.parts)} vs "
                f"{sorted(other.parts)}"
            )
        summed = {name: fs + other.parts[name] for name, fs in self.parts.items()}
        return CalibrationStats(summed, self.noise + other.noise)

    @property
    def paths(self) -> tuple[str, ...]:
        """The paths these statistics cover (both parts present)."""
        return tuple(p for p, parts in PATH_PARTS.items() if all(n in self.parts for n in parts))

    def rows(self, path: str) -> int:
        """How many rows the statistics of ``path`` count."""
        return int(self.parts[PATH_PARTS[path][0]].count.sum())

    def signal_to_noise(self, path: str) -> float:
        """The worse `signal_to_noise` of the path's two parts (inf for exact statistics)."""
        return min(signal_to_noise(self.parts[name], self.noise) for name in PATH_PARTS[path])


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


def row_noise(f_t: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Diffusion starting noise [n, dim], each row's drawn from a generator seeded by that
    row's own bytes: a row's recovered f^_i then depends on that row alone, not on which
    other rows share its batch (the per-sample bound of the DP mechanism needs that)."""
    out = torch.empty(len(f_t), dim)
    for i, row in enumerate(f_t.detach().to(torch.float32).contiguous().numpy()):
        digest = hashlib.blake2b(row.tobytes(), digest_size=8, key=seed.to_bytes(8, "little"))
        gen = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
        out[i] = torch.randn(dim, generator=gen)
    return out


def text_only_hidden(model: CrossModalNet, f_t: torch.Tensor) -> torch.Tensor:
    """Fusion output for text-only rows, as `CrossModalNet.forward` builds it: image slot
    empty, recovered slot f^_i from VLMR (the model's memory / global prototypes) or
    diffusion (from `row_noise`)."""
    n = len(f_t)
    f_i = f_t.new_zeros(n, model.config.image_dim)
    noise = row_noise(f_t, model.config.image_dim, model.config.sample_seed)
    rec_i = model.recover_image(f_t, noise=noise)
    has_t = torch.ones(n, dtype=torch.bool)
    return model.fusion.forward_views(f_t, f_i, has_t, ~has_t, torch.zeros_like(f_t), rec_i)


def _clipped(feats: torch.Tensor, clip_norm: float | None) -> torch.Tensor:
    if clip_norm is None:
        return feats
    norms = feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return feats * torch.clamp(clip_norm / norms, max=1.0)


def empty_stats(model: CrossModalNet) -> CalibrationStats:
    """All-zero statistics of the right shapes for the model's calibrated paths (what a
    client that declines sends)."""
    c, h = model.config.num_classes, model.config.hidden_dim
    no_rows = torch.zeros(0, dtype=torch.long)
    return CalibrationStats(
        {
            name: class_stats(torch.zeros(0, h), no_rows, c)
            for path in model.config.calibration_paths()
            for name in PATH_PARTS[path]
        }
    )


def _path_features(
    model: CrossModalNet, path: str, data: EmbeddingSet, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the unimodal classifier's body output, the head's input) of rows ``idx`` on the
    path's view."""
    if path == "image":
        f_i = data.image[idx]
        return _body_and_last(model.image_classifier)[0](f_i), image_only_hidden(model, f_i)
    f_t = data.text[idx]
    return _body_and_last(model.text_classifier)[0](f_t), text_only_hidden(model, f_t)


def _holds(data: EmbeddingSet, path: str) -> torch.Tensor:
    """Which rows of ``data`` a path's statistics cover: those holding its modality."""
    return data.has_image if path == "image" else data.has_text


def covered_rows(model: CrossModalNet, data: EmbeddingSet) -> int:
    """Rows of ``data`` some calibrated path counts (what a client declares it sent)."""
    held = torch.zeros(len(data), dtype=torch.bool)
    for path in model.config.calibration_paths():
        held |= _holds(data, path)
    return int(held.sum())


def served_model(model: CrossModalNet, prototypes: ClassPrototypes | None) -> CrossModalNet:
    """``model``'s shared weights as the global model is served (a model bundle, `crossfed
    evaluate`): an empty VLMR memory holding only the global prototypes (eq. 16). Text-only
    rows recover f^_i from it, so statistics taken on it match inference, whatever the
    client's own memory holds."""
    served = model_to_load(model.config)
    served.load_shareable_state_dict(model.shareable_state_dict())
    if prototypes is not None:
        apply_global_prototypes(served, prototypes)
    return served.eval()


@torch.no_grad()
def calibration_stats(
    model: CrossModalNet,
    data: EmbeddingSet,
    batch_size: int = 4096,
    clip_norm: float | None = None,
    prototypes: ClassPrototypes | None = None,
) -> CalibrationStats:
    """Client side: per-class stats of each calibrated path's two last-layer inputs on the
    rows of ``data`` holding the path's modality (the other hidden, as at inference, on
    `served_model(model, prototypes)`); with ``clip_norm``, each feature vector is first
    scaled to L2 <= clip_norm (bounded sensitivity for the DP mechanism of
    common/privacy/calibration_dp.py)."""
    c = model.config.num_classes
    parts = dict(empty_stats(model).parts)
    served = served_model(model, prototypes)
    for path in model.config.calibration_paths():
        body_name, head_name = PATH_PARTS[path]
        rows = _holds(data, path).nonzero().squeeze(1)
        for s in range(0, len(rows), batch_size):
            idx = rows[s : s + batch_size]
            body, hidden = _path_features(served, path, data, idx)
            y = data.labels[idx]
            parts[body_name] = parts[body_name] + class_stats(_clipped(body, clip_norm), y, c)
            parts[head_name] = parts[head_name] + class_stats(_clipped(hidden, clip_norm), y, c)
    return CalibrationStats(parts)


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


def _targets(
    model: CrossModalNet, path: str
) -> tuple[tuple[CalibratedLayer | None, nn.Linear], ...]:
    """(calibration layer, the federated last layer it starts from) for the path's parts."""
    if path == "image":
        return (
            (model.image_calibration, _body_and_last(model.image_classifier)[1]),
            (model.head_calibration, _linear(model.head)),
        )
    return (
        (model.text_calibration, _body_and_last(model.text_classifier)[1]),
        (model.text_head_calibration, _linear(model.head)),
    )


def _linear(layer: nn.Module) -> nn.Linear:
    if not isinstance(layer, nn.Linear):
        raise ModelInputError(f"the head must be nn.Linear, got {type(layer).__name__}")
    return layer


def calibrate_last_layers(
    model: CrossModalNet,
    stats: CalibrationStats,
    paths: tuple[str, ...],
    samples_per_class: int = 2000,
    steps: int = 200,
    lr: float = 1e-2,
    seed: int = 0,
) -> list[str]:
    """Server side: for each of ``paths``, fit its two calibration layers (copies of the
    federated last layers) on virtual features (`refit_linear`) and mark them ready. Returns
    the paths fitted (a path with fewer than two classes present is left as it was)."""
    fitted_paths = []
    for path in paths:
        fitted = []
        for (cal, last), name in zip(_targets(model, path), PATH_PARTS[path], strict=True):
            if not isinstance(cal, CalibratedLayer):
                raise ModelInputError(f"model has no {path}-path calibration layers")
            layer = refit_linear(last, stats.parts[name], samples_per_class, steps, lr, seed)
            if layer is None:
                break
            fitted.append((cal, layer))
        else:
            with torch.no_grad():
                for cal, layer in fitted:
                    cal.weight.copy_(layer.weight)
                    cal.bias.copy_(layer.bias)
                    cal.ready.fill_(True)
            fitted_paths.append(path)
    return fitted_paths


_FIELDS = ("count", "sum", "outer")


def stats_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Wire names and shapes of a client's calibration statistics (all float64): for each
    part of each calibrated path (`PATH_PARTS`: "classifier" and "head" for the image path,
    "text_classifier" and "text_head" for the text path), ``<part>.count`` [C], ``.sum``
    [C, h], ``.outer`` [C, h, h], with h the width the last layers read (hidden_dim)."""
    c, h = config.num_classes, config.hidden_dim
    shapes = {"count": (c,), "sum": (c, h), "outer": (c, h, h)}
    out = {
        f"{part}.{name}": shapes[name]
        for path in config.calibration_paths()
        for part in PATH_PARTS[path]
        for name in _FIELDS
    }
    return {**out, **{f"noise.{name}_var": () for name in _FIELDS}}


def stats_to_tensors(stats: CalibrationStats) -> dict[str, torch.Tensor]:
    """The tensors a client uploads in the calibration round (names of `stats_shapes`)."""
    out: dict[str, torch.Tensor] = {}
    for part, fs in stats.parts.items():
        for name, tensor in zip(_FIELDS, (fs.count, fs.total, fs.outer), strict=True):
            out[f"{part}.{name}"] = tensor.to(torch.float64).contiguous()
    noise = stats.noise
    for name, value in zip(_FIELDS, (noise.count, noise.total, noise.outer), strict=True):
        out[f"noise.{name}_var"] = torch.tensor(value, dtype=torch.float64)
    return out


def stats_from_tensors(
    tensors: Mapping[str, torch.Tensor], paths: tuple[str, ...] = ("image",)
) -> CalibrationStats:
    """Inverse of `stats_to_tensors` for the statistics of ``paths`` (shapes checked by
    `FeatureStats`)."""
    parts = [part for path in paths for part in PATH_PARTS[path]]
    names = [f"{p}.{n}" for p in parts for n in _FIELDS] + [f"noise.{n}_var" for n in _FIELDS]
    missing = sorted(name for name in names if name not in tensors)
    if missing:
        raise ModelInputError(f"calibration statistics lack {', '.join(missing)}")
    noise = NoiseVariance(*(float(tensors[f"noise.{name}_var"]) for name in _FIELDS))
    return CalibrationStats(
        {
            part: FeatureStats(*(tensors[f"{part}.{name}"].to(torch.float64) for name in _FIELDS))
            for part in parts
        },
        noise,
    )


def check_client_stats(
    tensors: Mapping[str, torch.Tensor], num_samples: int, paths: tuple[str, ...] = ("image",)
) -> None:
    """Plausibility of one client's statistics before the server adds them: whole,
    non-negative counts, the same in both parts of a path, none adding up to more than the
    ``num_samples`` it declared (<= what it registered, so one client cannot outweigh the
    rest), a declaration no larger than the rows its paths count, and sums of outer products
    with a non-negative diagonal. Raises `ModelInputError` naming the problem."""
    stats = stats_from_tensors(tensors, paths)
    noise = stats.noise
    if min(noise.count, noise.total, noise.outer) < 0:
        raise ModelInputError("noise variances must be >= 0")
    for part, fs in stats.parts.items():
        count = fs.count
        if bool((count < 0).any()) or not torch.equal(count, count.round()):
            raise ModelInputError(f"{part}.count must hold whole numbers >= 0")
        if int(count.sum()) > num_samples:
            raise ModelInputError(
                f"{part}.count adds up to {int(count.sum())} rows but the upload declares "
                f"num_samples={num_samples}"
            )
        if bool((fs.outer.diagonal(dim1=1, dim2=2) < 0).any()):
            raise ModelInputError(f"{part}.outer has a negative diagonal (not a sum of squares)")
        empty = count == 0
        if bool(fs.total[empty].any()) or bool(fs.outer[empty].any()):
            raise ModelInputError(f"{part}: a class with count 0 has non-zero sums")
    for path in paths:
        body, head = (stats.parts[name] for name in PATH_PARTS[path])
        if not torch.equal(body.count, head.count):
            raise ModelInputError(f"the {path} path's two parts count different rows")
    covered = sum(stats.rows(path) for path in paths)
    if num_samples > covered:
        raise ModelInputError(
            f"the upload declares num_samples={num_samples} but its paths count {covered} rows"
        )


def calibrated_state(
    config: ModelConfig,
    global_state: Mapping[str, torch.Tensor],
    stats: CalibrationStats,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """Server side of the calibration round: (the global shareable state with the calibration
    layers of every path it could fit, what was done), or (None, why not) when no path can be
    fitted: fewer than two classes with statistics, or DP noise that swamps them
    (`MIN_SIGNAL_TO_NOISE`)."""
    usable, skipped = [], []
    for path in config.calibration_paths():
        snr = stats.signal_to_noise(path)
        noisy = "" if math.isinf(snr) else f" (DP-noised statistics, signal-to-noise {snr:.3g})"
        if snr < MIN_SIGNAL_TO_NOISE:
            skipped.append(f"{path}-only: DP noise swamps the class statistics{noisy}")
        else:
            usable.append((path, noisy))
    model = model_to_load(config)
    model.load_shareable_state_dict(global_state)
    fitted = calibrate_last_layers(model, stats, tuple(p for p, _ in usable), seed=seed)
    skipped += [
        f"{p}-only: fewer than two classes have statistics" for p, _ in usable if p not in fitted
    ]
    done = [f"{p}-only last layers fitted{noisy}" for p, noisy in usable if p in fitted]
    if not done:
        return None, "; ".join(skipped) + "; left uncalibrated"
    return model.shareable_state_dict(), "; ".join(done + skipped)
