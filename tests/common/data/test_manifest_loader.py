"""Manifest loader: modalities from empty cells, bad rows reported by line, strict mode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from crossfed.common.data.data_errors import ManifestError
from crossfed.common.data.manifest import load_manifest
from PIL import Image


def _image(path: Path) -> None:
    Image.fromarray(np.full((10, 12, 3), 200, dtype=np.uint8)).save(path)


def test_csv_with_bad_rows(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "m.csv").write_text(
        "image,text,label\n"
        "a.png,a red circle,cat\n"  # line 2: paired
        ",only text,dog\n"  # line 3: text-only
        "a.png,,dog\n"  # line 4: image-only
        "missing.png,x,cat\n"  # line 5: missing file
        "broken.png,x,cat\n"  # line 6: unreadable
        "a.png,x,horse\n"  # line 7: unknown label
        ",,cat\n"  # line 8: both absent
    )
    res = load_manifest(tmp_path / "m.csv", class_names=["cat", "dog"], image_size=16)
    d = res.dataset
    assert len(d) == 3 and d.images.shape == (3, 16, 16, 3)
    assert d.has_text.tolist() == [True, True, False]
    assert d.has_image.tolist() == [True, False, True]
    assert d.labels.tolist() == [0, 1, 1]
    assert d.images[1].sum() == 0 and d.images[0].mean() > 150
    lines = {i.line: i.reason for i in res.issues}
    assert set(lines) == {5, 6, 7, 8}
    assert "not found" in lines[5] and "unreadable" in lines[6]
    assert "unknown label" in lines[7] and "both modalities" in lines[8]
    with pytest.raises(ManifestError, match="line 5"):
        load_manifest(tmp_path / "m.csv", class_names=["cat", "dog"], strict=True)


def test_jsonl_infers_classes(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "text": "t", "label": "b"},
        {"text": "u", "label": "a"},
        {"text": "v"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{oops\n")
    res = load_manifest(tmp_path / "m.jsonl")
    assert res.dataset.class_names == ["a", "b"] and res.dataset.labels.tolist() == [1, 0]
    assert [(i.line, "label" in i.reason or "JSON" in i.reason) for i in res.issues] == [
        (3, True),
        (4, True),
    ]


def test_unusable_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "none.csv")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ManifestError, match="unsupported"):
        load_manifest(tmp_path / "m.txt")
    (tmp_path / "n.csv").write_text("image,text\na.png,x\n")
    with pytest.raises(ManifestError, match="no label column"):
        load_manifest(tmp_path / "n.csv")


def test_integer_labels_are_indices_not_string_sorted(tmp_path: Path) -> None:
    """ "10" must stay class 10 (string sorting would put it before "2"), and a file that lacks
    a class must not shift the indices after it."""
    path = tmp_path / "m.jsonl"
    rows = [{"text": f"sample {i}", "label": lab} for i, lab in enumerate(["2", "10", "3", "10"])]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    result = load_manifest(path)
    assert result.dataset.labels.tolist() == [2, 10, 3, 10]
    assert len(result.dataset.class_names) == 11
