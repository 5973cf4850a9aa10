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


def _png_declaring(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def test_errors_name_file_line_and_column(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    _png_declaring(tmp_path / "bomb.png", 100_000, 100_000)
    path = tmp_path / "m.csv"
    path.write_text("image,text,label\na.png,x,cat\nmissing.png,y,cat\nbomb.png,z,cat\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path, class_names=["cat", "dog"], strict=True)
    assert str(info.value).startswith(f"{path}: line 3, column 'image': image file not found")
    result = load_manifest(path, class_names=["cat", "dog"])
    assert [i.line for i in result.issues] == [3, 4] and len(result.dataset) == 1
    assert "pixel" in result.issues[1].reason.lower()  # refused from its header, not decoded
    summary = result.skipped_summary(path)
    assert summary.startswith(f"{path}: skipped 2 of 3 rows (lines 3, 4); first: line 3")


def test_non_utf8_manifest_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(b"image,text,label\n,fine,cat\n,caf\xe9,cat\n")
    with pytest.raises(ManifestError, match=r"m\.csv: line 3, byte 5: not UTF-8"):
        load_manifest(path)


def test_spreadsheet_byte_order_mark_is_not_part_of_the_header(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes("\ufefflabel,text\ncat,a cat\n".encode())
    assert load_manifest(path).dataset.texts == ["a cat"]
