"""A small image + caption dataset written the way a user's own data arrives: a folder of
PNG files and CSV manifests (image path, caption, label; an empty cell = that modality is
missing). Procedurally drawn, so tests need no download, and unrelated to the built-in
synthetic shapes: each class is an object with its own colour and pattern."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("lemon", "plum", "lime", "tomato", "blueberry")
_COLOURS = {
    "lemon": (235, 210, 40),
    "plum": (110, 40, 120),
    "lime": (90, 200, 60),
    "tomato": (220, 50, 40),
    "blueberry": (50, 70, 190),
}
_WORDS = {
    "lemon": ("a lemon", "a sour yellow citrus", "lemon slices"),
    "plum": ("a plum", "a ripe purple plum", "some plums"),
    "lime": ("a lime", "a small green citrus", "limes in a bowl"),
    "tomato": ("a tomato", "a red tomato", "cherry tomatoes"),
    "blueberry": ("blueberries", "a handful of blueberries", "a blue berry"),
}
_TEMPLATES = ("a photo of {}", "{} on a kitchen table", "close-up of {}", "{} at the market")
#: Captions that name no fruit: a text-only row like this can only be guessed.
_VAGUE = ("some fruit on a plate", "a snack for later", "fresh from the garden", "a round thing")


@dataclass(frozen=True)
class PhotoRow:
    image: str  # path relative to the manifest, "" when missing
    text: str  # "" when missing
    label: str


def draw(label: str, rng: np.random.Generator, size: int = 48) -> Image.Image:
    """One picture of ``label``: a jittered blob of its colour on a random backdrop."""
    back = tuple(int(v) for v in rng.integers(150, 256, 3))
    img = Image.new("RGB", (size, size), back)
    pen = ImageDraw.Draw(img)
    colour = np.clip(np.array(_COLOURS[label]) + rng.integers(-70, 71, 3), 0, 255)
    for _ in range(int(rng.integers(1, 4))):
        r = int(rng.integers(size // 6, size // 3))
        x, y = (int(v) for v in rng.integers(r, size - r, 2))
        pen.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in colour))
    noise = rng.integers(-20, 21, (size, size, 3))
    pixels = np.clip(np.asarray(img, dtype=np.int64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def caption(label: str, rng: np.random.Generator) -> str:
    if rng.random() < 0.25:
        return _VAGUE[int(rng.integers(len(_VAGUE)))]
    words = _WORDS[label][int(rng.integers(len(_WORDS[label])))]
    return _TEMPLATES[int(rng.integers(len(_TEMPLATES)))].format(words)


def write_manifest(path: Path, rows: list[PhotoRow]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "text", "label"])
        for row in rows:
            writer.writerow([row.image, row.text, row.label])
    return path


def make_rows(
    root: Path,
    prefix: str,
    n: int,
    rng: np.random.Generator,
    *,
    text: bool,
    image: bool,
    labelled: bool = True,
) -> list[PhotoRow]:
    """``n`` rows with pictures saved under root/images/ (when ``image``)."""
    out = []
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = CLASSES[int(rng.integers(len(CLASSES)))]
        rel = ""
        if image:
            rel = f"images/{prefix}-{i:04d}.png"
            draw(label, rng).save(root / rel)
        out.append(PhotoRow(rel, caption(label, rng) if text else "", label if labelled else ""))
    return out


def write_photo_dataset(root: Path, rows_per_site: int = 150, seed: int = 0) -> Path:
    """The README walkthrough's folder: site-a.csv (image + caption), site-b.csv (captions
    only), site-c.csv (images only), test.csv (labelled, both), new.csv (unlabelled, mixed),
    classes.txt. Returns ``root``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    write_manifest(
        root / "site-a.csv", make_rows(root, "a", rows_per_site, rng, text=True, image=True)
    )
    write_manifest(
        root / "site-b.csv", make_rows(root, "b", rows_per_site, rng, text=True, image=False)
    )
    write_manifest(
        root / "site-c.csv", make_rows(root, "c", rows_per_site, rng, text=False, image=True)
    )
    write_manifest(
        root / "test.csv", make_rows(root, "t", rows_per_site, rng, text=True, image=True)
    )
    new = make_rows(root, "n", 8, rng, text=True, image=True, labelled=False)
    new += make_rows(root, "m", 4, rng, text=True, image=False, labelled=False)
    new += make_rows(root, "k", 4, rng, text=False, image=True, labelled=False)
    write_manifest(root / "new.csv", new)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    return root
