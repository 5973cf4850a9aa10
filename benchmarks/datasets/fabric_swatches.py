"""Fabric swatches: a second manifest-format benchmark dataset, procedurally generated offline.

Different source from the built-in synthetic shapes (common/data/synthetic_shapes.py): the
visual concept is a periodic texture filling the whole picture, not one object on a backdrop,
and the label is (pattern, scale) -- 6 patterns x 2 scales = 12 classes. Colours are drawn at
random and carry no label information. Captions follow a shop-listing / review grammar.

Each modality alone is ambiguous in a different way, so pairing helps:
- the caption names the pattern (often by a synonym, sometimes by a vague word shared by two
  patterns, sometimes not at all) and the scale only sometimes;
- the picture always shows the pattern at its scale, but fine and bold periods overlap,
  contrast can be low, and noise and a fold shadow blur fine patterns at 32 pixels.
A share of rows (``label_noise``) carries a label drawn uniformly at random.

Writes ``<out>/images/NNNNNN.png``, ``<out>/swatches.csv`` (columns image,text,label: the
project's manifest format, README "Your own data") and ``<out>/classes.txt``. Deterministic
by seed. Usage:

    python benchmarks/datasets/fabric_swatches.py --out DIR [--samples 4000] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PATTERNS = ("stripes", "checks", "dots", "chevron", "waves", "tweed")
SCALES = ("fine", "bold")
MANIFEST_NAME = "swatches.csv"
CLASSES_NAME = "classes.txt"

#: Words that name one pattern.
_PATTERN_WORDS: dict[str, tuple[str, ...]] = {
    "stripes": ("stripes", "striped", "bands", "pinstripe", "bretton stripes", "ticking"),
    "checks": ("checks", "gingham", "checkerboard", "plaid squares", "buffalo check", "checked"),
    "dots": ("polka dots", "spots", "dotted", "pin dots", "spotted", "speckled dots"),
    "chevron": ("chevron", "zigzag", "herringbone arrows", "zig-zag", "sawtooth", "v-stripes"),
    "waves": ("waves", "wavy lines", "ripples", "ogee curves", "undulating bands", "squiggles"),
    "tweed": ("tweed", "heathered", "marled", "flecked", "melange", "nubby texture"),
}
#: Vague words, each shared by two patterns (the image decides).
_VAGUE_PATTERN_WORDS: dict[str, tuple[str, ...]] = {
    "stripes": ("lines", "linear print"),
    "chevron": ("lines", "angular print"),
    "waves": ("curvy print", "flowing lines"),
    "dots": ("small circles", "round print"),
    "checks": ("squares", "grid print"),
    "tweed": ("grainy print", "rough texture"),
}
_SCALE_WORDS: dict[str, tuple[str, ...]] = {
    "fine": ("fine", "narrow", "tiny", "micro", "delicate", "tight", "small-scale"),
    "bold": ("bold", "wide", "large", "chunky", "oversized", "statement", "big"),
}
_GARMENTS = (
    "scarf",
    "shirt",
    "tablecloth",
    "cushion cover",
    "dress",
    "tote bag",
    "curtain",
    "tie",
    "blanket",
    "apron",
    "skirt",
    "napkin",
)
_MATERIALS = ("cotton", "linen", "wool", "silk", "polyester", "denim", "flannel", "jersey")
_COLOUR_WORDS = ("navy", "mustard", "teal", "rust", "cream", "charcoal", "sage", "coral")
_REVIEW_BITS = (
    "washes well",
    "arrived quickly",
    "runs a bit small",
    "my favourite purchase",
    "softer than expected",
    "the colour fades a little",
    "great value",
    "would buy again",
)
_TEMPLATES = (
    "{material} {garment} with a {scale}{pattern} pattern",
    "listing: {garment}, {material}, {scale}{pattern}",
    "love this {scale}{pattern} {garment}, {review}",
    "{colour} {garment} in {scale}{pattern} {material}",
    "swatch #{number}: {scale}{pattern} on {material}",
    "the {garment} has {scale}{pattern} all over, {review}",
    "customer photo of my {material} {garment} ({scale}{pattern})",
    "{scale}{pattern} {material} fabric by the metre",
)
#: Captions that name neither pattern nor scale.
_BLANK_TEMPLATES = (
    "{material} {garment}, {review}",
    "{colour} {garment}, {review}",
    "swatch #{number} of {material}",
)


@dataclass(frozen=True)
class SwatchConfig:
    """Generator knobs; the defaults are the benchmark dataset."""

    num_samples: int = 4000
    seed: int = 0
    image_size: int = 32
    label_noise: float = 0.04  # share of rows whose label is drawn at random
    pattern_mention_rate: float = 0.65  # caption names the pattern exactly
    vague_mention_rate: float = 0.2  # otherwise: a word shared by two patterns
    scale_mention_rate: float = 0.4  # caption names the scale
    fine_period: tuple[float, float] = (3.0, 5.5)  # pixels per repeat (overlapping ranges)
    bold_period: tuple[float, float] = (4.8, 10.0)
    max_noise: float = 0.25


def class_names() -> list[str]:
    """Class index = pattern * 2 + scale."""
    return [f"{s} {p}" for p in PATTERNS for s in SCALES]


def _textures(
    rng: np.random.Generator, pattern: np.ndarray, period: np.ndarray, size: int
) -> np.ndarray:
    """Binary-ish texture masks in [0, 1], [n, size, size], rotated at random."""
    n = len(pattern)
    theta = rng.uniform(0, np.pi, n)[:, None, None]
    phase = rng.uniform(0, 1, (n, 2))
    grid = np.arange(size, dtype=np.float64)
    x, y = grid[None, None, :], grid[None, :, None]
    u = (x * np.cos(theta) + y * np.sin(theta)) / period[:, None, None] + phase[:, 0, None, None]
    v = (-x * np.sin(theta) + y * np.cos(theta)) / period[:, None, None] + phase[:, 1, None, None]
    duty = rng.uniform(0.35, 0.6, n)[:, None, None]
    out = np.empty((n, size, size))
    for k, name in enumerate(PATTERNS):
        sel = pattern == k
        if not sel.any():
            continue
        uu, vv, dd = u[sel], v[sel], duty[sel]
        if name == "stripes":
            m = np.mod(uu, 1.0) < dd
        elif name == "checks":
            m = (np.floor(uu) + np.floor(vv)) % 2 == 0
        elif name == "dots":
            du, dv = np.mod(uu, 1.0) - 0.5, np.mod(vv, 1.0) - 0.5
            m = du * du + dv * dv < (0.55 * dd) ** 2
        elif name == "chevron":
            zig = np.abs(np.mod(vv, 1.0) - 0.5)
            m = np.mod(uu + zig, 1.0) < dd
        elif name == "waves":
            m = np.mod(uu + 0.3 * np.sin(2 * np.pi * vv / 2.0), 1.0) < dd
        else:  # tweed: random flecks on a lattice of the period
            cells = int(np.ceil(1.5 * size / period[sel].min())) + 2
            flecks = rng.random((int(sel.sum()), cells, cells)) < 0.45
            iu = np.clip(np.floor(uu - uu.min(axis=(1, 2), keepdims=True)), 0, cells - 1)
            iv = np.clip(np.floor(vv - vv.min(axis=(1, 2), keepdims=True)), 0, cells - 1)
            rows = np.arange(len(iu))[:, None, None]
            m = flecks[rows, iu.astype(np.int64), iv.astype(np.int64)]
        out[sel] = m
    return out


def _draw_images(
    rng: np.random.Generator, pattern: np.ndarray, scale: np.ndarray, cfg: SwatchConfig
) -> np.ndarray:
    n, size = len(pattern), cfg.image_size
    lo = np.where(scale == 0, cfg.fine_period[0], cfg.bold_period[0])
    hi = np.where(scale == 0, cfg.fine_period[1], cfg.bold_period[1])
    period = rng.uniform(lo, hi)
    mask = _textures(rng, pattern, period, size)[..., None]
    base = rng.uniform(0.0, 1.0, (n, 3))
    contrast = rng.uniform(0.15, 0.8, n)[:, None] * rng.choice([-1.0, 1.0], (n, 3))
    other = np.clip(base + contrast, 0.0, 1.0)
    img = base[:, None, None, :] * (1 - mask) + other[:, None, None, :] * mask
    # a fold: a soft shadow band across the swatch
    grid = np.arange(size, dtype=np.float64)[None, :, None]
    centre = rng.uniform(0, size, n)[:, None, None]
    width = rng.uniform(2.0, 8.0, n)[:, None, None]
    depth = rng.uniform(0.0, 0.5, n)[:, None, None]
    shade = 1.0 - depth * np.exp(-(((grid - centre) / width) ** 2))
    img = img * shade[..., None]
    noise = rng.uniform(0.02, cfg.max_noise, n)[:, None, None, None]
    img = img + rng.normal(0.0, 1.0, img.shape) * noise
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(0, len(options)))]


def _caption(rng: np.random.Generator, pattern: int, scale: int, cfg: SwatchConfig) -> str:
    name = PATTERNS[pattern]
    fill = {
        "material": _pick(rng, _MATERIALS),
        "garment": _pick(rng, _GARMENTS),
        "colour": _pick(rng, _COLOUR_WORDS),
        "review": _pick(rng, _REVIEW_BITS),
        "number": str(int(rng.integers(100, 1000))),
    }
    mention = rng.random()
    if mention < cfg.pattern_mention_rate:
        word = _pick(rng, _PATTERN_WORDS[name])
    elif mention < cfg.pattern_mention_rate + cfg.vague_mention_rate:
        word = _pick(rng, _VAGUE_PATTERN_WORDS[name])
    else:
        return _pick(rng, _BLANK_TEMPLATES).format(**fill)
    scale_word = ""
    if rng.random() < cfg.scale_mention_rate:
        scale_word = _pick(rng, _SCALE_WORDS[SCALES[scale]]) + " "
    return _pick(rng, _TEMPLATES).format(pattern=word, scale=scale_word, **fill)


@dataclass(frozen=True)
class Swatches:
    """The generated rows: pictures, captions and (possibly noisy) labels."""

    images: np.ndarray  # uint8 [n, size, size, 3]
    texts: list[str]
    labels: np.ndarray  # int64 [n], index into class_names()


def generate_swatches(cfg: SwatchConfig) -> Swatches:
    """Every row from ``cfg.seed`` alone (same seed, same bytes)."""
    if cfg.num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {cfg.num_samples}")
    rng = np.random.default_rng([cfg.seed, 0x5A7C])
    n = cfg.num_samples
    pattern = rng.integers(0, len(PATTERNS), n)
    scale = rng.integers(0, len(SCALES), n)
    images = np.empty((n, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    for start in range(0, n, 1024):
        stop = min(n, start + 1024)
        images[start:stop] = _draw_images(rng, pattern[start:stop], scale[start:stop], cfg)
    texts = [_caption(rng, int(p), int(s), cfg) for p, s in zip(pattern, scale, strict=True)]
    labels = (pattern * len(SCALES) + scale).astype(np.int64)
    noisy = rng.random(n) < cfg.label_noise
    labels[noisy] = rng.integers(0, len(class_names()), int(noisy.sum()))
    return Swatches(images, texts, labels)


def write_manifest(out: Path, cfg: SwatchConfig) -> Path:
    """Generate the dataset into ``out`` (images/, swatches.csv, classes.txt); returns the
    manifest path."""
    data = generate_swatches(cfg)
    names = class_names()
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST_NAME
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "text", "label"])
        for i, (pixels, text, label) in enumerate(
            zip(data.images, data.texts, data.labels, strict=True)
        ):
            rel = f"images/{i:06d}.png"
            Image.fromarray(pixels).save(out / rel, optimize=False)
            writer.writerow([rel, text, names[int(label)]])
    (out / CLASSES_NAME).write_text("\n".join(names) + "\n", encoding="utf-8")
    return manifest


class BuildSettings(BaseModel):
    """Validated command-line input."""

    model_config = ConfigDict(extra="forbid")

    out: Path
    samples: int = Field(4000, gt=0, le=1_000_000)
    seed: int = Field(0, ge=0)
    image_size: int = Field(32, ge=16, le=256)
    label_noise: float = Field(0.04, ge=0, lt=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--label-noise", type=float, default=0.04)
    args = p.parse_args(argv)
    try:
        s = BuildSettings(**vars(args))
    except ValidationError as exc:
        print(f"error: invalid settings: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    cfg = SwatchConfig(
        num_samples=s.samples, seed=s.seed, image_size=s.image_size, label_noise=s.label_noise
    )
    try:
        manifest = write_manifest(s.out, cfg)
    except OSError as exc:
        print(f"error: cannot write {s.out}: {exc}", file=sys.stderr)
        return 2
    print(manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
