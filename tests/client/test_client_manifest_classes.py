"""Real data across clients: class indices come from the federation's shared class list, never
from one client's own labels (two clients holding different label subsets must agree): given
as --classes, or mapped by name after registration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from crossfed.client.errors import ClientConfigError
from crossfed.client.local_data import ClientModality, LocalData, LocalDataSpec, _load_raw
from crossfed.common.config import ClientConfig, load_config
from crossfed.common.data.embeddings import EmbeddingSet

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


def _local(labels: list[int], names: tuple[str, ...], final: bool) -> LocalData:
    n = len(labels)
    data = EmbeddingSet(
        text=torch.ones(n, 4),
        image=torch.zeros(n, 2),
        has_text=torch.ones(n, dtype=torch.bool),
        has_image=torch.zeros(n, dtype=torch.bool),
        labels=torch.tensor(labels),
    )
    return LocalData(
        data, data.subset([0]), ClientModality.TEXT_ONLY, "", names, labels_final=final
    )


def test_named_labels_without_a_class_list_map_onto_the_federations(tmp_path: Path) -> None:
    a = _manifest(tmp_path / "a.jsonl", ["dog", "cat", "dog"])
    raw = _load_raw(LocalDataSpec(source=str(a)))  # this file's own sorted names
    assert raw.class_names == ["cat", "dog"] and raw.labels.tolist() == [1, 0, 1]
    local = _local(raw.labels.tolist(), tuple(raw.class_names), final=False)
    mapped = local.for_federation(CLASSES)
    assert mapped.train.labels.tolist() == [2, 1, 2]  # the federation's indices
    assert mapped.holdout.labels.tolist() == [2]
    assert mapped.class_names == CLASSES and mapped.labels_final


def test_a_label_the_federation_lacks_is_named() -> None:
    local = _local([0, 1], ("cat", "zebra"), final=False)
    with pytest.raises(ClientConfigError, match="'zebra'"):
        local.for_federation(CLASSES)


def test_an_explicit_class_list_must_equal_the_federations() -> None:
    local = _local([0, 1], ("bird", "dog", "cat"), final=True)
    with pytest.raises(ClientConfigError, match="orders them differently"):
        local.for_federation(CLASSES)
    same = _local([0, 1], CLASSES, final=True)
    assert same.for_federation(CLASSES) is same


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
