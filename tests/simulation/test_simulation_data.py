"""The experiment's data: a user's manifest or the built-in shapes, encoded once through the
embedding cache; simulated missingness never takes a row's only modality; a manifest
experiment runs end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from crossfed.common.data import embedding_cache

from crossfed.simulation.experiment import (
    BuiltinSimData,
    ExperimentConfig,
    ManifestSimData,
)
from crossfed.simulation.experiment_run import run_experiment
from crossfed.simulation.federation_data import FederationSetup, build_federation, load_data
from tests.support.photo_manifest import CLASSES, make_rows, write_manifest


def _manifest(root: Path) -> Path:
    rng = np.random.default_rng(5)
    rows = make_rows(root, "p", 60, rng, text=True, image=True)
    rows += make_rows(root, "t", 30, rng, text=True, image=False)
    rows += make_rows(root, "i", 30, rng, text=False, image=True)
    return write_manifest(root / "site.csv", rows)


def test_a_manifest_federation_keeps_each_rows_only_modality(tmp_path: Path) -> None:
    spec = ManifestSimData(
        kind="manifest",
        path=_manifest(tmp_path),
        class_names=list(CLASSES),
        cache_dir=tmp_path / "cache",
    )
    loaded = load_data(spec)
    emb = loaded.embeddings
    assert loaded.class_names == CLASSES and len(emb) == 120
    assert emb.counts() == {"paired": 60, "text_only": 30, "image_only": 30}
    setup = FederationSetup("per_sample", 0.9, 1.0, 4, 0, min_samples=5)
    fed = build_federation(emb, setup, 0.25)
    train = fed.train
    assert bool((train.has_text | train.has_image).all())
    was = fed.full_train
    # a single-modality row keeps it; paired rows lose one at this rate
    assert bool((train.has_text == was.has_text)[~was.has_image].all())
    assert bool((train.has_image == was.has_image)[~was.has_text].all())
    assert int((train.has_text & train.has_image).sum()) < int((was.has_text & was.has_image).sum())
    assert sum(len(s) for s in fed.shards) == len(train)


def test_a_manifest_experiment_runs_end_to_end(tmp_path: Path) -> None:
    cfg = ExperimentConfig.model_validate(
        {
            "data": {
                "kind": "manifest",
                "path": str(_manifest(tmp_path)),
                "cache_dir": str(tmp_path / "cache"),
            },
            "federation": {"clients": 3, "dirichlet_alpha": 1.0, "min_samples_per_client": 5},
            "rounds": {"rounds": 1},
            "model": {"hidden_dim": 16},
            "methods": ["ours", "zero_fill"],
            "execution": {"backend": "inline"},
        }
    )
    result = run_experiment(cfg, progress=False)
    assert result.class_names == tuple(sorted(CLASSES))  # a manifest's own labels, sorted
    assert [r.method for r in result.runs] == ["ours", "zero_fill"]
    assert all(0.0 <= r.scores["both"]["accuracy"] <= 1.0 for r in result.runs)


def test_builtin_data_is_encoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = BuiltinSimData(num_samples=48, cache_dir=tmp_path / "cache")
    first = load_data(spec)
    assembled = list((tmp_path / "cache").glob("simulation-shapes-*.safetensors"))
    assert len(assembled) == 1 and len(first.class_names) == 12

    def encode_again(*args: object, **kw: object) -> None:
        raise AssertionError("encoded a second time")

    monkeypatch.setattr(embedding_cache, "encode_dataset", encode_again)
    again = load_data(spec)
    assert torch.equal(again.embeddings.text, first.embeddings.text)
    assert torch.equal(again.embeddings.image, first.embeddings.image)
