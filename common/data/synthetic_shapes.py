"""Built-in benchmark dataset: coloured shapes with paraphrased captions, generated from a seed.

The label is (shape, colour): 4 shapes x 3 colour families = 12 classes. The caption always
names the shape (with synonyms, paraphrases and distractor words) but only sometimes the
colour; the image always shows the colour but the shape is often small or noisy. So each
modality alone falls short of a paired model, and each carries partial evidence of the other's
factor (a colour word in the text, a legible shape in the image) -- recoverable cross-modal
information that recovery (eq. 4-11) can exploit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from crossfed.common.data.data_errors import DataError
from crossfed.common.data.raw_dataset import RawDataset

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue")

_SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round dot", "ring", "orb", "round blob", "circular shape"),
    "square": ("square", "box", "block", "tile", "four-sided figure", "boxy shape", "quad"),
    "triangle": (
        "triangle",
        "wedge",
        "pyramid shape",
        "three-sided figure",
        "arrowhead",
        "triangular shape",
        "delta",
    ),
    "cross": (
        "cross",
        "plus sign",
        "plus",
        "crossed bars",
        "x mark",
        "cross shape",
        "pair of crossing bars",
    ),
}
_COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet", "ruby", "cherry-coloured", "reddish", "brick-red"),
    "green": ("green", "emerald", "lime", "olive", "leafy green", "greenish", "jade"),
    "blue": ("blue", "navy", "azure", "cobalt", "sky-blue", "bluish", "sapphire"),
}
# Colour by association ("the colour of a ripe tomato"): many rare phrasings, so learning
# them from text alone needs many samples -- recoverable from paired data.
_COLOUR_REFERENCES: dict[str, tuple[str, ...]] = {
    "red": (
        "a ripe tomato",
        "a fire truck",
        "fresh blood",
        "a stop sign",
        "a strawberry",
        "a cardinal bird",
        "hot chili",
        "a ladybug",
        "a red rose",
        "cherries",
        "lava",
        "a post box in London",
        "ketchup",
        "a fox's fur",
        "rusty iron",
    ),
    "green": (
        "fresh grass",
        "a frog",
        "a pine forest",
        "a lime",
        "moss",
        "a cucumber",
        "spring leaves",
        "a tree frog",
        "a pickle",
        "mint leaves",
        "broccoli",
        "a golf course",
        "an avocado",
        "a parrot's wing",
        "seaweed",
    ),
    "blue": (
        "a clear sky",
        "the ocean",
        "blueberries",
        "a sapphire",
        "a swimming pool",
        "a bluebird",
        "denim jeans",
        "a glacier lake",
        "a peacock's neck",
        "cornflowers",
        "a police light",
        "deep sea water",
        "a robin's egg",
        "ink",
        "a blue whale",
    ),
}
# Vague tone words: partial colour evidence ("warm" means red; "cool" is green or blue).
_TONE_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("warm-toned", "fiery", "hot-looking"),
    "green": ("cool-toned", "calm-coloured", "cold-looking"),
    "blue": ("cool-toned", "calm-coloured", "cold-looking"),
}
_SIZE_WORDS = ("tiny", "small", "little", "medium", "large", "big", "huge")
_CONTEXTS = (
    "on a wooden table",
    "in the afternoon light",
    "next to a lamp",
    "drawn quickly",
    "from my notebook",
    "on a sticky note",
    "in a children's book",
    "on the whiteboard",
    "seen from above",
    "printed on a flyer",
    "in a blurry snapshot",
    "on a T-shirt",
)
_BACKDROP_COLOURS = ("grey", "beige", "black", "white", "dark", "red", "green", "blue", "pale")
_TEMPLATES = (
    "a photo of a {adj}{shape}{ctx}",
    "there is a {adj}{shape}{ctx}",
    "this picture shows a {adj}{shape}{ctx}",
    "{ctx_lead}someone drew a {adj}{shape}",
    "an image containing one {adj}{shape}{ctx}",
    "look, a {adj}{shape}{ctx}",
    "the {shape} here is {adj_pred}{ctx}",
    "i think this is a {adj}{shape}{ctx}",
)


@dataclass(frozen=True)
class SyntheticShapesConfig:
    """Knobs of the generator; the defaults are the benchmark dataset."""

    num_samples: int = 20_000
    image_size: int = 32
    seed: int = 0
    colour_mention_rate: float = 0.2  # caption names the colour exactly
    reference_mention_rate: float = 0.35  # otherwise: colour by association (rare phrasings)
    tone_mention_rate: float = 0.2  # otherwise: caption gives a vague warm/cool tone
    backdrop_mention_rate: float = 0.25  # distractor colour word about the background
    min_radius: float = 3.0
    max_radius: float = 11.0
    hue_jitter_deg: float = 18.0
    max_noise: float = 0.3


def class_names() -> list[str]:
    """Class index = shape * 3 + colour."""
    return [f"{c} {s}" for s in SHAPES for c in COLOURS]


def generate_synthetic_shapes(cfg: SyntheticShapesConfig | None = None) -> RawDataset:
    """Generate the dataset deterministically from cfg.seed (all modalities present)."""
    cfg = cfg or SyntheticShapesConfig()
    if cfg.num_samples <= 0:
        raise DataError(f"num_samples must be positive, got {cfg.num_samples}")
    if cfg.image_size < 32:
        raise DataError(f"image_size must be >= 32, got {cfg.image_size}")
    rng = np.random.default_rng(cfg.seed)
    n = cfg.num_samples
    shape = rng.integers(0, len(SHAPES), n)
    colour = rng.integers(0, len(COLOURS), n)
    labels = (shape * len(COLOURS) + colour).astype(np.int64)
    images = np.empty((n, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    chunk = 2048
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        images[start:stop] = _draw_images(rng, shape[start:stop], colour[start:stop], cfg)
    texts = [_caption(rng, int(s), int(c), cfg) for s, c in zip(shape, colour)]
    ones = np.ones(n, dtype=bool)
    return RawDataset(
        images=images,
        texts=texts,
        labels=labels,
        has_text=ones.copy(),
        has_image=ones.copy(),
        class_names=class_names(),
    )


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV->RGB; h in degrees, s and v in [0, 1]; returns [..., 3]."""
    h = np.mod(h, 360.0) / 60.0
    c = v * s
    x = c * (1 - np.abs(np.mod(h, 2) - 1))
    m = v - c
    z = np.zeros_like(h)
    sector = np.floor(h).astype(np.int64) % 6
    r = np.choose(sector, [c, x, z, z, x, c])
    g = np.choose(sector, [x, c, c, x, z, z])
    b = np.choose(sector, [z, z, x, c, c, x])
    return np.stack([r + m, g + m, b + m], axis=-1)


def _draw_images(
    rng: np.random.Generator, shape: np.ndarray, colour: np.ndarray, cfg: SyntheticShapesConfig
) -> np.ndarray:
    n, size = len(shape), cfg.image_size
    radius = rng.uniform(cfg.min_radius, cfg.max_radius, n)
    cx = rng.uniform(radius + 1, size - 1 - radius)
    cy = rng.uniform(radius + 1, size - 1 - radius)
    theta = rng.uniform(0, 2 * np.pi, n)
    grid = np.arange(size, dtype=np.float64) + 0.5
    dx = grid[None, None, :] - cx[:, None, None]
    dy = grid[None, :, None] - cy[:, None, None]
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    r = radius[:, None, None]
    circle = u * u + v * v <= r * r
    square = np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    triangle = np.ones_like(circle)
    for phi in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
        triangle &= u * np.cos(phi) + v * np.sin(phi) <= 0.5 * r
    bar = 0.3 * r
    cross = ((np.abs(u) <= bar) & (np.abs(v) <= r)) | ((np.abs(v) <= bar) & (np.abs(u) <= r))
    masks = np.stack([circle, square, triangle, cross], axis=1)  # [n, 4, H, W]
    mask = masks[np.arange(n), shape][..., None].astype(np.float64)

    hue = colour * 120.0 + rng.normal(0.0, cfg.hue_jitter_deg, n)
    fg = _hsv_to_rgb(hue, rng.uniform(0.55, 1.0, n), rng.uniform(0.55, 1.0, n))
    bg = _hsv_to_rgb(rng.uniform(0, 360, n), rng.uniform(0.0, 0.35, n), rng.uniform(0.1, 0.6, n))
    img = bg[:, None, None, :] * (1 - mask) + fg[:, None, None, :] * mask
    noise = rng.uniform(0.0, cfg.max_noise, n)[:, None, None, None]
    img = img + rng.normal(0.0, 1.0, img.shape) * noise
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(0, len(options)))]


def _caption(rng: np.random.Generator, shape: int, colour: int, cfg: SyntheticShapesConfig) -> str:
    shape_word = _pick(rng, _SHAPE_WORDS[SHAPES[shape]])
    adjs: list[str] = []
    if rng.random() < 0.5:
        adjs.append(_pick(rng, _SIZE_WORDS))
    ctx_parts: list[str] = []
    mention = rng.random()
    if mention < cfg.colour_mention_rate:
        adjs.append(_pick(rng, _COLOUR_WORDS[COLOURS[colour]]))
    elif mention < cfg.colour_mention_rate + cfg.tone_mention_rate:
        adjs.append(_pick(rng, _TONE_WORDS[COLOURS[colour]]))
    elif mention < (cfg.colour_mention_rate + cfg.tone_mention_rate + cfg.reference_mention_rate):
        reference = f"the colour of {_pick(rng, _COLOUR_REFERENCES[COLOURS[colour]])}"
        ctx_parts.append(reference)
    if rng.random() < 0.6:
        ctx_parts.append(_pick(rng, _CONTEXTS))
    if rng.random() < cfg.backdrop_mention_rate:
        ctx_parts.append(f"against a {_pick(rng, _BACKDROP_COLOURS)} backdrop")
    ctx = (" " + " ".join(ctx_parts)) if ctx_parts else ""
    template = _pick(rng, _TEMPLATES)
    adj = " ".join(adjs) + " " if adjs else ""
    adj_pred = " and ".join(adjs) if adjs else "plain"
    ctx_lead = (" ".join(ctx_parts) + ", ") if ctx_parts else ""
    return template.format(adj=adj, shape=shape_word, ctx=ctx, adj_pred=adj_pred, ctx_lead=ctx_lead)
