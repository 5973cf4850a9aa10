"""Local data shaping: Table I modality masking, holdout split, config translation (per-client
missingness) and clear errors for bad sources."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from crossfed.client.daemon import DaemonOptions, data_spec_from_config, format_round
from crossfed.client.errors import ClientConfigError
from crossfed.client.local_data import ClientModality, LocalDataSpec, load_local_data
from crossfed.client.loop import RoundReport
from crossfed.common.config import ClientConfig
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.data.missingness import per_client_modalities


def _save_set(path: Path, n: int = 40) -> Path:
    labels = torch.arange(n) % 4
    EmbeddingSet(
        text=torch.randn(n, 8),
        image=torch.randn(n, 6),
        has_text=torch.ones(n, dtype=torch.bool),
        has_image=torch.ones(n, dtype=torch.bool),
        labels=labels,
    ).save(path)
    return path


@pytest.mark.parametrize(
    ("modality", "text", "image"),
    [("text_only", True, False), ("image_only", False, True), ("both", True, True)],
)
def test_embedding_file_is_masked_to_the_client_modality(
    tmp_path: Path, modality: str, text: bool, image: bool
) -> None:
    path = _save_set(tmp_path / "set.safetensors")
    data = load_local_data(
        LocalDataSpec(source=str(path), modality=modality, holdout_fraction=0.25)
    )
    assert len(data.train) == 30 and len(data.holdout) == 10
    for part in (data.train, data.holdout):
        assert bool(part.has_text.all()) is text and bool(part.has_text.any()) is text
        assert bool(part.has_image.all()) is image and bool(part.has_image.any()) is image
        if not image:
            assert torch.count_nonzero(part.image) == 0  # nothing of the hidden modality left
    # Train and holdout are disjoint parts of the same 40 samples.
    assert len(data.train) + len(data.holdout) == 40


def test_bad_sources_and_values_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ClientConfigError, match="not 'builtin:shapes'"):
        load_local_data(LocalDataSpec(source=str(tmp_path / "x.parquet")))
    with pytest.raises(ClientConfigError, match="cannot load"):
        load_local_data(LocalDataSpec(source=str(tmp_path / "missing.safetensors")))
    with pytest.raises(ClientConfigError, match="modality 'audio'"):
        LocalDataSpec(modality="audio")  # type: ignore[arg-type]
    with pytest.raises(ClientConfigError, match="client index 3"):
        LocalDataSpec(client_index=3, num_clients=3)


def test_per_client_missingness_decides_the_modality(tmp_path: Path) -> None:
    drawn = per_client_modalities(8, 0.5, seed=5)
    for index, (has_text, has_image) in enumerate(drawn):
        config = ClientConfig.model_validate(
            {
                "data": {
                    "num_clients": 8,
                    "client_index": index,
                    "seed": 5,
                    "missing": {"mode": "per_client", "rate": 0.5},
                }
            }
        )
        spec = data_spec_from_config(config, DaemonOptions(state_dir=tmp_path))
        expected = (
            ClientModality.BOTH
            if has_text and has_image
            else ClientModality.TEXT_ONLY
            if has_text
            else ClientModality.IMAGE_ONLY
        )
        assert spec.modality is expected
        assert spec.missing_rate == 0.0


def test_per_sample_rate_and_explicit_modality_pass_through(tmp_path: Path) -> None:
    config = ClientConfig.model_validate(
        {"data": {"modality": "image_only", "missing": {"mode": "per_sample", "rate": 0.3}}}
    )
    spec = data_spec_from_config(config, DaemonOptions(state_dir=tmp_path, data_file=None))
    assert spec.modality is ClientModality.IMAGE_ONLY and spec.missing_rate == 0.3


def test_round_line_shows_round_loss_accuracy_bytes_and_time() -> None:
    report = RoundReport(
        round_id=7,
        metrics={
            "loss_cls": 0.5,
            "local_acc_text_only": 0.75,
            "global_acc_text_only": 0.5,
            "peak_rss_mib": 512.0,
        },
        bytes_up=3 * 2**20,
        bytes_down=2**20,
        seconds=4.25,
        duplicate=False,
        encrypted=True,
    )
    line = format_round(report)
    for part in (
        "round   7",
        "loss 0.500",
        "acc local/global text 0.750/0.500",
        "up 3.00 MiB",
        "down 1.00 MiB",
        "4.2 s",
        "peak RSS 512 MiB",
    ):
        assert part in line, (part, line)
    assert "clear" not in line and "nan" not in line and "both" not in line
    paired = dict(report.metrics, local_acc_both=0.9, global_acc_both=0.8, local_acc_image_only=0.6)
    line = format_round(replace(report, metrics=paired))
    assert "acc local/global both 0.900/0.800 text 0.750/0.500 image 0.600/-" in line
