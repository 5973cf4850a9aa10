"""The second benchmark dataset (benchmarks/datasets/fabric_swatches.py): a tiny build goes
through the project's manifest loader, is deterministic by seed, and its captions and
pictures carry the label (each modality separates classes the other cannot)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from crossfed.common.data.manifest import load_manifest
from datasets.fabric_swatches import (
    CLASSES_NAME,
    PATTERNS,
    SwatchConfig,
    class_names,
    generate_swatches,
    main,
    write_manifest,
)


def test_tiny_build_loads_through_the_manifest_loader(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "sw", SwatchConfig(num_samples=48, seed=3))
    names = (tmp_path / "sw" / CLASSES_NAME).read_text().split("\n")[:-1]
    assert names == class_names() and len(names) == 12
    result = load_manifest(manifest, class_names=names, image_size=32, strict=True)
    data = result.dataset
    assert len(data) == 48 and result.issues == []
    assert data.has_text.all() and data.has_image.all()
    assert data.images.shape == (48, 32, 32, 3)
    assert set(data.labels.tolist()) <= set(range(12))
    # the loaded pixels are the generated ones (PNG is lossless)
    generated = generate_swatches(SwatchConfig(num_samples=48, seed=3))
    np.testing.assert_array_equal(data.images, generated.images)
    assert list(data.labels) == list(generated.labels)


def test_deterministic_by_seed(tmp_path: Path) -> None:
    a = write_manifest(tmp_path / "a", SwatchConfig(num_samples=20, seed=1))
    b = write_manifest(tmp_path / "b", SwatchConfig(num_samples=20, seed=1))
    c = write_manifest(tmp_path / "c", SwatchConfig(num_samples=20, seed=2))
    assert a.read_text() == b.read_text() != c.read_text()
    assert (tmp_path / "a/images/000007.png").read_bytes() == (
        tmp_path / "b/images/000007.png"
    ).read_bytes()


def test_label_noise_share_and_modalities_carry_the_label() -> None:
    clean = generate_swatches(SwatchConfig(num_samples=3000, seed=0, label_noise=0.0))
    noisy = generate_swatches(SwatchConfig(num_samples=3000, seed=0, label_noise=0.2))
    flipped = float(np.mean(clean.labels != noisy.labels))
    assert 0.12 < flipped < 0.24  # 0.2 redrawn, 1/12 of them land on the same class
    # a caption that names a pattern's exact word holds the true pattern's word
    for text, label in zip(clean.texts[:300], clean.labels[:300], strict=True):
        pattern = PATTERNS[int(label) // 2]
        if pattern in text:
            assert all(p == pattern or p not in text.split() for p in PATTERNS)
    # pictures of fine patterns vary faster than bold ones: mean absolute neighbour difference
    img = clean.images.astype(np.float64).mean(axis=3)
    roughness = np.abs(np.diff(img, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(img, axis=2)).mean(
        axis=(1, 2)
    )
    contrast = img.std(axis=(1, 2)) + 1e-6
    rel = roughness / contrast
    fine, bold = clean.labels % 2 == 0, clean.labels % 2 == 1
    assert rel[fine].mean() > rel[bold].mean()


def test_cli_refuses_bad_settings(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path / "x"), "--samples", "0"]) == 2
    assert main(["--out", str(tmp_path / "y"), "--samples", "5"]) == 0
    assert len((tmp_path / "y" / "swatches.csv").read_text().splitlines()) == 6
