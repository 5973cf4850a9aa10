"""Manifest loader for a user's own data: CSV or JSONL rows of (image path, text, label).

An empty image or text cell means that modality is missing for the row: a row's Table I
configuration (both, text only, image only) comes from its cells, not from a flag. Bad rows
(missing or unreadable image, unknown or empty label, both cells empty) are reported with
file, line and column, and either skipped or made fatal (`strict`).

`iter_manifest_rows` streams rows without loading images (what `crossfed predict` batches
over); `load_manifest` loads a whole file into a RawDataset (what a client trains on).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from crossfed.common.data.class_list import label_index
from crossfed.common.data.data_errors import ManifestError
from crossfed.common.data.raw_dataset import RawDataset
from PIL import Image

IMAGE_KEYS = ("image", "image_path", "img")
TEXT_KEYS = ("text", "caption")
LABEL_KEYS = ("label", "class", "y")
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
#: Images whose header declares more pixels than this are refused before decoding (a
#: decompression bomb: a tiny file declaring 100000 x 100000 would take tens of GB).
MAX_IMAGE_PIXELS = 64_000_000


@dataclass(frozen=True)
class ManifestIssue:
    """One rejected row: the file line it came from, the column at fault, and why."""

    line: int
    reason: str
    column: str = ""

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", column '{self.column}'" if self.column else "")
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class ManifestRow:
    """One well-formed row: image file (None when the cell is empty), caption, label cell."""

    line: int
    image: Path | None
    text: str
    label: str

    @property
    def configuration(self) -> str:
        """Table I configuration of the row: 'both', 'text_only' or 'image_only'."""
        if self.image is not None and self.text:
            return "both"
        return "text_only" if self.text else "image_only"


@dataclass
class ManifestResult:
    """The loaded samples plus every row that was rejected."""

    dataset: RawDataset
    issues: list[ManifestIssue]
    rows: int = 0  # data rows read (good and rejected)

    def skipped_summary(self, path: str | Path, shown: int = 5) -> str:
        """One line: how many rows were skipped, which lines, and the first reasons."""
        if not self.issues:
            return ""
        lines = ", ".join(str(i.line) for i in self.issues[:shown])
        more = ", ..." if len(self.issues) > shown else ""
        return (
            f"{path}: skipped {len(self.issues)} of {self.rows} rows (lines {lines}{more}); "
            f"first: {self.issues[0]}"
        )


def _pick(row: dict[str, Any], keys: Sequence[str]) -> tuple[str, str]:
    """(value, column name) of the first of ``keys`` present in the row."""
    for key in keys:
        if key in row and row[key] is not None:
            return str(row[key]).strip(), key
    return "", keys[0]


def _check_utf8(path: Path) -> None:
    """Fail with file, line and byte column when the manifest is not UTF-8 text."""
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ManifestError(
                    f"{path}: line {line_no}, byte {exc.start + 1}: not UTF-8 text "
                    f"({exc.reason}); save the manifest as UTF-8"
                ) from None


def _raw_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(line number, row or None, parse problem) for every data row."""
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ManifestError(f"{path}: unsupported manifest type (use .csv or .jsonl)")
    if suffix == ".csv":
        # utf-8-sig: a byte-order mark (spreadsheet exports) must not become part of a header
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            try:
                for row in reader:
                    yield reader.line_num, {k.strip(): v for k, v in row.items() if k}, ""
            except csv.Error as exc:
                raise ManifestError(f"{path}: line {reader.line_num}: bad CSV: {exc}") from None
        return
    with path.open(encoding="utf-8-sig") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield line_no, None, f"invalid JSON at character {exc.pos + 1} ({exc.msg})"
                continue
            if not isinstance(obj, dict):
                yield line_no, None, "JSON line is not an object"
                continue
            yield line_no, obj, ""


def _check_header(path: Path, require_label: bool) -> None:
    """A CSV must name its columns: an image or text column, and a label one when needed."""
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise ManifestError(f"{path}: unsupported manifest type (use .csv or .jsonl)")
    _check_utf8(path)
    if path.suffix.lower() != ".csv":
        return
    with path.open(encoding="utf-8-sig", newline="") as fh:
        fields = {f.strip() for f in (csv.DictReader(fh).fieldnames or [])}
    if require_label and not fields & set(LABEL_KEYS):
        raise ManifestError(f"{path}: line 1: header has no label column (one of {LABEL_KEYS})")
    if not fields & set(IMAGE_KEYS + TEXT_KEYS):
        raise ManifestError(
            f"{path}: line 1: header has neither an image column {IMAGE_KEYS} nor a text "
            f"column {TEXT_KEYS}"
        )


def iter_manifest_rows(
    path: str | Path,
    *,
    base_dir: str | Path | None = None,
    require_label: bool = True,
    class_names: Sequence[str] | None = None,
) -> Iterator[ManifestRow | ManifestIssue]:
    """Stream a manifest's rows in file order; a bad row comes out as a ManifestIssue.

    Images are not opened here (only checked to exist). Relative image paths resolve against
    ``base_dir`` (default: the manifest's folder). With ``class_names``, a label that names
    no class is an issue; ``require_label`` False accepts rows without one (predict).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    _check_header(path, require_label)
    root = Path(base_dir) if base_dir is not None else path.parent
    known = {name: i for i, name in enumerate(class_names)} if class_names is not None else None
    for line, row, problem in _raw_rows(path):
        if row is None:
            yield ManifestIssue(line, problem)
            continue
        image_cell, image_col = _pick(row, IMAGE_KEYS)
        text, text_col = _pick(row, TEXT_KEYS)
        label, label_col = _pick(row, LABEL_KEYS)
        if require_label and not label:
            yield ManifestIssue(line, "empty label", label_col)
            continue
        if label and known is not None and label_index(label, known) is None:
            yield ManifestIssue(line, f"unknown label '{label}'", label_col)
            continue
        if not image_cell and not text:
            yield ManifestIssue(
                line, f"both modalities absent (empty '{image_col}' and '{text_col}')"
            )
            continue
        image: Path | None = None
        if image_cell:
            image = Path(image_cell)
            image = image if image.is_absolute() else root / image
            if not image.is_file():
                yield ManifestIssue(line, f"image file not found: {image}", image_col)
                continue
        yield ManifestRow(line, image, text, label)


class ImageRowError(ValueError):
    """An image file a row names cannot be used (unreadable, hostile, too large)."""


def load_image(path: Path, size: int) -> np.ndarray:
    """An image file as uint8 RGB [size, size, 3]. Raises ImageRowError, whatever PIL raised,
    and when its header declares more than MAX_IMAGE_PIXELS (never decoded then)."""
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


#: What `load_image` raises for a row's image.
IMAGE_ERRORS = (ImageRowError,)


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
    the good rows (this file's own list: a federated client maps them onto the federation's
    classes after registering). With `strict`, the first bad row raises ManifestError naming
    file, line and column; otherwise bad rows are skipped and returned in `issues`.
    """
    path = Path(path)
    known = {name: i for i, name in enumerate(class_names)} if class_names is not None else None
    issues: list[ManifestIssue] = []
    images: list[np.ndarray] = []
    texts: list[str] = []
    raw_labels: list[str] = []
    has_image: list[bool] = []
    rows = 0

    def reject(issue: ManifestIssue) -> None:
        if strict:
            raise ManifestError(
                f"{path}: {issue} (skip_bad_rows / --skip-bad-rows skips such rows)"
            )
        issues.append(issue)

    for item in iter_manifest_rows(path, base_dir=base_dir, class_names=class_names):
        rows += 1
        if isinstance(item, ManifestIssue):
            reject(item)
            continue
        pixels = np.zeros((image_size, image_size, 3), dtype=np.uint8)
        if item.image is not None:
            try:
                pixels = load_image(item.image, image_size)
            except IMAGE_ERRORS as exc:
                reject(ManifestIssue(item.line, f"unreadable image {item.image}: {exc}", "image"))
                continue
        images.append(pixels)
        texts.append(item.text)
        raw_labels.append(item.label)
        has_image.append(item.image is not None)

    if known is not None:
        names = list(known)
        labels = [int(label_index(lab, known) or 0) for lab in raw_labels]  # all known here
    elif raw_labels and all(lab.isdigit() for lab in raw_labels):
        # Integer labels are class indices as they stand: sorting them as strings would map
        # "10" before "2", and a client missing a class would shift every index after it.
        labels = [int(lab) for lab in raw_labels]
        names = [str(i) for i in range(max(labels) + 1)]
    else:
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
        has_text=np.asarray([bool(t) for t in texts], dtype=bool),
        has_image=np.asarray(has_image, dtype=bool),
        class_names=names,
    )
    return ManifestResult(dataset=dataset, issues=issues, rows=rows)
