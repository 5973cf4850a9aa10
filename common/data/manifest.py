"""Manifest loader for real datasets: CSV or JSONL rows of (image path, text, label).

An empty image or text cell means that modality is missing for the sample. Bad rows (missing
or unreadable image file, unknown or empty label, both modalities absent) are reported with
their line numbers and either skipped or made fatal (`strict`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from crossfed.common.data.data_errors import ManifestError
from crossfed.common.data.raw_dataset import RawDataset
from PIL import Image

IMAGE_KEYS = ("image", "image_path", "img")
TEXT_KEYS = ("text", "caption")
LABEL_KEYS = ("label", "class", "y")


@dataclass(frozen=True)
class ManifestIssue:
    """One rejected row: the file line it came from and why."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class ManifestResult:
    """The loaded samples plus every row that was rejected."""

    dataset: RawDataset
    issues: list[ManifestIssue]


def _pick(row: dict[str, Any], keys: Sequence[str]) -> str:
    for key in keys:
        if key in row and row[key] is not None:
            return str(row[key]).strip()
    return ""


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(line number, row or None, parse problem)."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield line_no, None, f"invalid JSON ({exc.msg})"
                    continue
                if not isinstance(obj, dict):
                    yield line_no, None, "JSON line is not an object"
                    continue
                yield line_no, obj, ""
    elif path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            fields = {f.strip() for f in (reader.fieldnames or [])}
            if not fields & set(LABEL_KEYS):
                raise ManifestError(f"{path}: header has no label column (one of {LABEL_KEYS})")
            for row in reader:
                yield reader.line_num, {k.strip(): v for k, v in row.items() if k}, ""
    else:
        raise ManifestError(f"{path}: unsupported manifest type (use .csv or .jsonl)")


#: Largest image a manifest row may name (width x height, from the file's header, checked
#: before anything is decoded): 64 Mpx is 192 MB of RGB; a header claiming 100000 x 100000
#: (a "decompression bomb", 30 GB) is a bad row, not an out-of-memory kill.
MAX_IMAGE_PIXELS = 64_000_000


class ImageRowError(ValueError):
    """A manifest image cannot be used (unreadable, or declared larger than allowed)."""


def _load_image(path: Path, size: int) -> np.ndarray:
    """Decode one image into size x size RGB; any failure is an `ImageRowError`."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageRowError(
                    f"its header declares {width}x{height} pixels, more than the "
                    f"{MAX_IMAGE_PIXELS:,} allowed"
                )
            rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except ImageRowError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRowError(f"it declares too many pixels ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on hostile files
        raise ImageRowError(f"{type(exc).__name__}: {exc}") from None


def load_manifest(
    path: str | Path,
    class_names: Sequence[str] | None = None,
    image_size: int = 64,
    strict: bool = False,
    base_dir: str | Path | None = None,
) -> ManifestResult:
    """Read a manifest; relative image paths resolve against `base_dir` (default: its folder).

    `class_names` fixes the label set (labels may be names or indices into it); without it,
    integer labels are used as class indices, and names become the sorted distinct labels of
    the good rows (meaningful for this file only: federated clients must share one list). With `strict`, the first bad
    row raises ManifestError; otherwise bad rows are skipped and returned in `issues`.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    root = Path(base_dir) if base_dir is not None else path.parent
    known = {name: i for i, name in enumerate(class_names)} if class_names is not None else None
    issues: list[ManifestIssue] = []
    images: list[np.ndarray] = []
    texts: list[str] = []
    raw_labels: list[str] = []
    has_text: list[bool] = []
    has_image: list[bool] = []

    def reject(line: int, reason: str) -> None:
        issue = ManifestIssue(line, reason)
        if strict:
            raise ManifestError(f"{path}: {issue}")
        issues.append(issue)

    for line, row, problem in _rows(path):
        if row is None:
            reject(line, problem)
            continue
        image_cell, text, label = (
            _pick(row, IMAGE_KEYS),
            _pick(row, TEXT_KEYS),
            _pick(row, LABEL_KEYS),
        )
        if not label:
            reject(line, "empty label")
            continue
        if (
            known is not None
            and label not in known
            and not (label.isdigit() and int(label) < len(known))
        ):
            reject(line, f"unknown label '{label}'")
            continue
        if not image_cell and not text:
            reject(line, "both modalities absent (empty image and text)")
            continue
        pixels = np.zeros((image_size, image_size, 3), dtype=np.uint8)
        if image_cell:
            file = Path(image_cell)
            file = file if file.is_absolute() else root / file
            if not file.is_file():
                reject(line, f"image file not found: {file}")
                continue
            try:
                pixels = _load_image(file, image_size)
            except ImageRowError as exc:
                reject(line, f"unreadable image {file}: {exc}")
                continue
        images.append(pixels)
        texts.append(text)
        raw_labels.append(label)
        has_text.append(bool(text))
        has_image.append(bool(image_cell))

    if known is not None:
        names = list(known)
        labels = [known[lab] if lab in known else int(lab) for lab in raw_labels]
    elif raw_labels and all(lab.isdigit() for lab in raw_labels):
        # Integer labels are class indices as they stand: sorting them as strings would map
        # "10" before "2", and a client missing a class would shift every index after it.
        labels = [int(lab) for lab in raw_labels]
        names = [str(i) for i in range(max(labels) + 1)]
    else:
        # Names without a fixed class list: indices are only meaningful for this one file, so
        # federated clients must pass `class_names` (the federation's shared list).
        names = sorted(set(raw_labels))
        index = {name: i for i, name in enumerate(names)}
        labels = [index[lab] for lab in raw_labels]
    if not labels:
        raise ManifestError(
            f"{path}: no usable rows ({len(issues)} rejected: {'; '.join(map(str, issues[:5]))})"
        )
    dataset = RawDataset(
        images=np.stack(images),
        texts=texts,
        labels=np.asarray(labels, dtype=np.int64),
        has_text=np.asarray(has_text, dtype=bool),
        has_image=np.asarray(has_image, dtype=bool),
        class_names=names,
    )
    return ManifestResult(dataset=dataset, issues=issues)
