"""Generic procedural image corpus for pretraining our default E_i (eq. 1) offline.

The offline analogue of ImageNet: many drawing primitives (ellipses, 3..8-gons, stars,
crosses, rings, lines, stripe and checker patches) at random sizes, positions, rotations and
hues over the whole colour circle, on noisy gradient backgrounds with small clutter. Each image
carries its generator factors (primitive, hue bin, size bin, quadrant) as pretext labels.
Independent of the benchmark generator (common/data/synthetic_shapes.py) and its labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from crossfed.common.data.data_errors import DataError

PRIMITIVES: tuple[str, ...] = (
    "ellipse",
    "triangle",
    "quadrilateral",
    "pentagon",
    "hexagon",
    "heptagon_or_octagon",
    "star",
    "cross",
    "ring",
    "line",
    "stripes",
    "checker",
)
NUM_HUE_BINS = 12  # 30 degrees each, over the whole hue circle
NUM_SIZE_BINS = 3
NUM_QUADRANTS = 4
_PATTERNS = frozenset({"star", "ring", "line", "stripes", "checker"})  # need room to be legible


@dataclass(frozen=True)
class PrimitiveCorpusConfig:
    """Knobs of the corpus; defaults are what the shipped CNN was pretrained on."""

    image_size: int = 32
    min_radius: float = 3.0
    max_radius: float = 14.0
    pattern_min_radius: float = 5.5
    max_clutter: int = 3
    clutter_rate: float = 0.35  # chance of each clutter slot being drawn
    max_noise: float = 0.2

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise DataError(f"image_size must be >= 16, got {self.image_size}")
        if not 0 < self.min_radius <= self.pattern_min_radius < self.max_radius:
            raise DataError(
                "need 0 < min_radius <= pattern_min_radius < max_radius, got "
                f"{self.min_radius}, {self.pattern_min_radius}, {self.max_radius}"
            )
        if self.max_radius > self.image_size / 2:
            raise DataError(f"max_radius {self.max_radius} too large for {self.image_size} px")

    def size_edges(self) -> tuple[float, float]:
        """Radius thresholds of the 3 size bins (equal thirds of the radius range)."""
        step = (self.max_radius - self.min_radius) / NUM_SIZE_BINS
        return self.min_radius + step, self.min_radius + 2 * step


@dataclass(frozen=True)
class PrimitiveBatch:
    """Images [N, H, W, 3] uint8 and the main object's generator factors (int64 [N] each)."""

    images: np.ndarray
    primitive: np.ndarray
    hue_bin: np.ndarray
    size_bin: np.ndarray
    quadrant: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class _Frame:
    """Per-image object coordinates: u, v rotated into the object frame, r its radius."""

    u: np.ndarray  # [n, H, W]
    v: np.ndarray
    r: np.ndarray  # [n, 1, 1]
    aspect: np.ndarray
    param: np.ndarray  # per-primitive extra parameter in [0, 1)


def _polygon(sides: int | np.ndarray) -> Callable[[_Frame], np.ndarray]:
    def sdf(f: _Frame) -> np.ndarray:
        n_sides = np.asarray(sides, dtype=np.float32).reshape(-1, 1, 1)
        v = f.v / f.aspect
        theta = np.arctan2(v, f.u)
        sector = 2 * np.pi / n_sides
        local = np.mod(theta + np.pi / 2, sector) - sector / 2  # angle to the nearest face
        rho = np.sqrt(f.u * f.u + v * v)
        return rho * np.cos(local) - f.r * np.cos(np.pi / n_sides)

    return sdf


def _ellipse(f: _Frame) -> np.ndarray:
    b = f.r * f.aspect
    norm = np.sqrt((f.u / f.r) ** 2 + (f.v / b) ** 2)
    return (norm - 1.0) * b


def _many_gon(f: _Frame) -> np.ndarray:
    return _polygon(np.where(f.param < 0.5, 7, 8))(f)


def _star(f: _Frame) -> np.ndarray:
    points = 5 + np.floor(f.param * 4)  # 5..8 points
    inner = 0.38 + 0.15 * f.aspect  # valley radius ratio
    theta = np.arctan2(f.v, f.u)
    frac = np.mod(theta * points / (2 * np.pi), 1.0)
    depth = 2 * np.minimum(frac, 1 - frac)  # 0 at a tip, 1 in a valley
    boundary = f.r * (1 - (1 - inner) * depth)
    return np.sqrt(f.u * f.u + f.v * f.v) - boundary


def _cross(f: _Frame) -> np.ndarray:
    width = f.r * (0.18 + 0.22 * f.param)
    au, av = np.abs(f.u), np.abs(f.v)
    return np.minimum(np.maximum(au - f.r, av - width), np.maximum(av - f.r, au - width))


def _ring(f: _Frame) -> np.ndarray:
    thickness = f.r * (0.2 + 0.25 * f.param)
    return np.abs(_ellipse(f) + thickness / 2) - thickness / 2


def _line(f: _Frame) -> np.ndarray:
    half_width = 0.7 + 1.6 * f.param
    return np.maximum(np.abs(f.u) - f.r, np.abs(f.v) - half_width)


def _window(f: _Frame) -> np.ndarray:
    """Disc (aspect < 0.75) or square window the stripe/checker pattern is cut to."""
    disc = np.sqrt(f.u * f.u + f.v * f.v) - f.r
    square = np.maximum(np.abs(f.u), np.abs(f.v)) - 0.85 * f.r
    return np.where(f.aspect < 0.75, disc, square)


def _stripes(f: _Frame) -> np.ndarray:
    period = 3.0 + 4.0 * f.param
    frac = np.mod(f.v / period, 1.0)
    band = (np.abs(frac - 0.5) - 0.25) * period
    return np.maximum(band, _window(f))


def _checker(f: _Frame) -> np.ndarray:
    cell = 2.5 + 3.5 * f.param
    parity = (np.floor(f.u / cell) + np.floor(f.v / cell)) % 2
    return np.maximum(np.where(parity > 0, 0.5, -0.5), _window(f))


_SDFS: dict[str, Callable[[_Frame], np.ndarray]] = {
    "ellipse": _ellipse,
    "triangle": _polygon(3),
    "quadrilateral": _polygon(4),
    "pentagon": _polygon(5),
    "hexagon": _polygon(6),
    "heptagon_or_octagon": _many_gon,
    "star": _star,
    "cross": _cross,
    "ring": _ring,
    "line": _line,
    "stripes": _stripes,
    "checker": _checker,
}


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV -> RGB [n, 3] with h in degrees; s, v in [0, 1]."""
    k = np.mod(np.array([5.0, 3.0, 1.0]) + (np.mod(h, 360.0) / 60.0)[:, None], 6.0)
    mix = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return (v[:, None] - (v * s)[:, None] * mix).astype(np.float32)


def _coverage(
    rng: np.random.Generator,
    kinds: np.ndarray,
    radius: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    size: int,
) -> np.ndarray:
    """Anti-aliased (or hard-edged) coverage [n, H, W] in [0, 1] of one object per image."""
    n = len(kinds)
    theta = rng.uniform(0, 2 * np.pi, n)
    aspect = rng.uniform(0.5, 1.0, n)
    param = rng.random(n)
    softness = np.where(rng.random(n) < 0.4, 0.05, rng.uniform(0.5, 1.2, n))
    grid = np.arange(size, dtype=np.float32) + 0.5
    out = np.zeros((n, size, size), dtype=np.float32)
    for kind in np.unique(kinds):
        idx = np.flatnonzero(kinds == kind)
        col = (slice(None), None, None)
        dx = grid[None, None, :] - cx[idx][col]
        dy = grid[None, :, None] - cy[idx][col]
        cos, sin = np.cos(theta[idx])[col], np.sin(theta[idx])[col]
        frame = _Frame(
            u=(dx * cos + dy * sin).astype(np.float32),
            v=(-dx * sin + dy * cos).astype(np.float32),
            r=radius[idx][col].astype(np.float32),
            aspect=aspect[idx][col].astype(np.float32),
            param=param[idx][col].astype(np.float32),
        )
        sdf = _SDFS[PRIMITIVES[int(kind)]](frame)
        out[idx] = np.clip(0.5 - sdf / softness[idx][col], 0.0, 1.0)
    return out


def _background(rng: np.random.Generator, fg_value: np.ndarray, size: int) -> np.ndarray:
    """Flat, gradient or blotchy backgrounds [n, H, W, 3] whose value differs from the object's."""
    n = len(fg_value)
    away = rng.uniform(0.25, 0.65, n)
    value = np.where(fg_value - away >= 0.03, fg_value - away, np.minimum(fg_value + away, 1.0))
    base = _hsv_to_rgb(rng.uniform(0, 360, n), rng.uniform(0, 0.7, n), value)
    img = np.broadcast_to(base[:, None, None, :], (n, size, size, 3)).copy()
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    angle = rng.uniform(0, 2 * np.pi, n)
    ramp = np.cos(angle)[:, None, None] * grid[None, None, :] + (
        np.sin(angle)[:, None, None] * grid[None, :, None]
    )
    strength = np.where(rng.random(n) < 0.4, rng.uniform(0.1, 0.4, n), 0.0).astype(np.float32)
    img += (ramp * strength[:, None, None])[..., None]
    blotch = rng.random(n) < 0.3
    if blotch.any():
        coarse = rng.normal(0, 0.12, (int(blotch.sum()), 4, 4, 3)).astype(np.float32)
        cells = np.minimum((np.arange(size) * 4) // size, 3)
        smooth = coarse[:, cells][:, :, cells]  # nearest upsample, then box blur
        kernel = max(size // 8, 1)
        for axis in (1, 2):
            shifted = [np.roll(smooth, s, axis=axis) for s in range(-kernel, kernel + 1)]
            smooth = np.mean(shifted, axis=0, dtype=np.float32)
        img[blotch] += smooth
    return img


def generate_primitives(
    rng: np.random.Generator, count: int, cfg: PrimitiveCorpusConfig | None = None
) -> PrimitiveBatch:
    """Draw `count` labelled images from `rng` (deterministic given its state)."""
    cfg = cfg or PrimitiveCorpusConfig()
    if count <= 0:
        raise DataError(f"count must be positive, got {count}")
    size = cfg.image_size
    kinds = rng.integers(0, len(PRIMITIVES), count)
    is_pattern = np.isin(kinds, [PRIMITIVES.index(p) for p in _PATTERNS])
    low = np.where(is_pattern, cfg.pattern_min_radius, cfg.min_radius)
    radius = rng.uniform(low, cfg.max_radius)
    margin = 0.6 * np.minimum(radius, size / 2)
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    hue = rng.uniform(0, 360, count)
    fg_value = rng.uniform(0.35, 1.0, count)
    fg = _hsv_to_rgb(hue, rng.uniform(0.4, 1.0, count), fg_value)

    img = _background(rng, fg_value, size)
    for _ in range(cfg.max_clutter):
        active = np.flatnonzero(rng.random(count) < cfg.clutter_rate)
        if not len(active):
            continue
        k = len(active)
        small = rng.uniform(1.5, 0.4 * cfg.min_radius + 2.5, k)
        cov = _coverage(
            rng,
            rng.integers(0, len(PRIMITIVES), k),
            small,
            rng.uniform(0, size, k),
            rng.uniform(0, size, k),
            size,
        )
        colour = _hsv_to_rgb(rng.uniform(0, 360, k), rng.uniform(0, 1, k), rng.uniform(0, 1, k))
        alpha = (cov * rng.uniform(0.3, 0.8, k)[:, None, None])[..., None]
        img[active] = img[active] * (1 - alpha) + colour[:, None, None, :] * alpha

    cov = _coverage(rng, kinds, radius, cx, cy, size)[..., None]
    img = img * (1 - cov) + fg[:, None, None, :] * cov
    noise = rng.uniform(0.0, cfg.max_noise, count).astype(np.float32)[:, None, None, None]
    img += rng.standard_normal(img.shape, dtype=np.float32) * noise
    images = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    small_edge, large_edge = cfg.size_edges()
    return PrimitiveBatch(
        images=images,
        primitive=kinds.astype(np.int64),
        hue_bin=np.minimum((hue // (360 / NUM_HUE_BINS)).astype(np.int64), NUM_HUE_BINS - 1),
        size_bin=np.digitize(radius, [small_edge, large_edge]).astype(np.int64),
        quadrant=((cy >= size / 2) * 2 + (cx >= size / 2)).astype(np.int64),
    )
