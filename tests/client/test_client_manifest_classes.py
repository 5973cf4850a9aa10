"""Real data across clients: class indices come from the federation's shared class list, never
from one client's own labels (two clients holding different label subsets must agree)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from crossfed.client.errors import ClientConfigError
from crossfed.client.local_data import LocalDataSpec, _load_raw
from crossfed.common.config import ClientConfig, load_config

CLASSES = ("bird", "cat", "dog")


def _manifest(path: Path, labels: list[str]) -> Path:
    rows = [{"text": f"a picture of a {lab}", "label": lab} for lab in labels]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_clients_with_disjoint_labels_share_indices(tmp_path: Path) -> None:
    a = _manifest(tmp_path / "a.jsonl", ["dog", "dog", "cat"])
    b = _manifest(tmp_path / "b.jsonl", ["bird", "dog"])
    raw_a = _load_raw(LocalDataSpec(source=str(a), class_names=CLASSES))
    raw_b = _load_raw(LocalDataSpec(source=str(b), class_names=CLASSES))
    assert raw_a.labels.tolist() == [2, 2, 1]
    assert raw_b.labels.tolist() == [0, 2]  # "dog" is 2 on both clients


def test_named_labels_without_a_class_list_are_refused(tmp_path: Path) -> None:
    a = _manifest(tmp_path / "a.jsonl", ["dog", "cat"])
    with pytest.raises(ClientConfigError, match="class list"):
        _load_raw(LocalDataSpec(source=str(a)))


def test_integer_labels_need_no_class_list(tmp_path: Path) -> None:
    a = _manifest(tmp_path / "a.jsonl", ["2", "0"])
    assert _load_raw(LocalDataSpec(source=str(a))).labels.tolist() == [2, 0]


def test_unknown_label_is_fatal_unless_bad_rows_are_skipped(tmp_path: Path) -> None:
    a = _manifest(tmp_path / "a.jsonl", ["dog", "zebra"])
    with pytest.raises(Exception, match="zebra"):
        _load_raw(LocalDataSpec(source=str(a), class_names=CLASSES))
    raw = _load_raw(LocalDataSpec(source=str(a), class_names=CLASSES, skip_bad_rows=True))
    assert raw.labels.tolist() == [2]


def test_class_list_from_cli_style_override() -> None:
    cfg = load_config(
        ClientConfig,
        overrides={
            "data.kind": "manifest",
            "data.path": "x.csv",
            "data.class_names": list(CLASSES),
        },
    )
    assert cfg.data.class_names == list(CLASSES)  # type: ignore[union-attr]
