"""`crossfed evaluate` / `crossfed predict` on a model bundle: rows on their Table I paths, bad
rows and bad inputs as one line with exit code 2, encoders checked against the bundle's."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from crossfed.common.model.encoder_identity import EncoderIdentity
from crossfed.common.model.encoders import build_image_encoder, build_text_encoder
from crossfed.common.model.model_bundle import ModelBundle
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet
from crossfed.common.wire.tensor_codec import encode_tensors
from typer.testing import CliRunner

from crossfed.cli import app
from tests.support.photo_manifest import CLASSES, make_rows, write_manifest

runner = CliRunner()
CONFIG = ModelConfig(text_dim=384, image_dim=256, hidden_dim=16, num_classes=len(CLASSES))


@pytest.fixture(scope="module")
def encoders() -> tuple[EncoderIdentity, EncoderIdentity]:
    text, image = build_text_encoder("minilm"), build_image_encoder("cnn")
    return EncoderIdentity("minilm", text.identity), EncoderIdentity("cnn", image.identity, 32)


def _bundle(path: Path, text: EncoderIdentity, image: EncoderIdentity) -> Path:
    torch.manual_seed(0)
    bundle = ModelBundle(
        state=CrossModalNet(CONFIG).shareable_state_dict(),
        model_config=CONFIG,
        class_names=CLASSES,
        text_encoder=text,
        image_encoder=image,
        round=2,
    )
    path.write_bytes(bundle.encode())
    return path


def _data(root: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = make_rows(root, "p", 3, rng, text=True, image=True)
    rows += make_rows(root, "t", 2, rng, text=True, image=False)
    rows += make_rows(root, "i", 2, rng, text=False, image=True)
    return write_manifest(root / "rows.csv", rows)


def _invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_predict_serves_each_row_on_its_path_and_reports_bad_rows(
    tmp_path: Path, encoders: tuple[EncoderIdentity, EncoderIdentity]
) -> None:
    bundle = _bundle(tmp_path / "m.safetensors", *encoders)
    data = _data(tmp_path)
    (tmp_path / "images" / "broken.png").write_bytes(b"not a picture")
    with data.open("a") as fh:
        fh.write("images/broken.png,a lemon,\n,,\n")  # lines 9 and 10
    out = tmp_path / "pred.csv"
    cache = ["--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    code, _, err = _invoke("predict", str(bundle), str(data), "--out", str(out), *cache)
    assert code == 2 and "line 9, column 'image': unreadable image" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()

    code, stdout, err = _invoke(
        "predict", str(bundle), str(data), "--out", str(out), "--skip-bad-rows", *cache
    )
    assert code == 0, err
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["line"] for r in rows] == [str(n) for n in range(2, 11)]  # one per input row
    paths = [r["path"].split(":")[0] for r in rows]
    assert paths == ["both"] * 3 + ["text_only"] * 2 + ["image_only"] * 2 + ["", ""]
    assert "unreadable image" in rows[7]["error"] and "both modalities absent" in rows[8]["error"]
    assert all(r["predicted"] in CLASSES for r in rows[:7])
    for r in rows[:7]:  # top-k probabilities sum to at most 1, best first
        probs = [float(item.split(":")[1]) for item in r["top_k"].split(";")]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
    assert "7 predictions" in stdout and "2 rows skipped" in stdout

    code, _, err = _invoke("predict", str(bundle), str(data), "--out", str(out), *cache)
    assert code == 2 and "already exists" in err
    code, _, err = _invoke("predict", str(bundle), str(data), "--out", str(tmp_path), "--force")
    assert code == 2 and "not a regular file" in err


def test_evaluate_refuses_other_encoder_weights_and_bare_checkpoints(
    tmp_path: Path, encoders: tuple[EncoderIdentity, EncoderIdentity]
) -> None:
    text, image = encoders
    other = EncoderIdentity("cnn", image.identity.replace("pretrained:", "pretrained:0ther"), 32)
    data = _data(tmp_path)
    bundle = _bundle(tmp_path / "other.safetensors", text, other)
    code, _, err = _invoke("evaluate", str(bundle), str(data), "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "trained with image encoder" in err and "use the same encoder weights" in err

    checkpoint = tmp_path / "global-000002.safetensors"
    checkpoint.write_bytes(encode_tensors(CrossModalNet(CONFIG).shareable_state_dict()))
    code, _, err = _invoke("evaluate", str(checkpoint), str(data))
    assert code == 2 and "not a crossfed model bundle (a bare checkpoint?" in err


def test_evaluate_json_scores_every_configuration(
    tmp_path: Path, encoders: tuple[EncoderIdentity, EncoderIdentity]
) -> None:
    bundle = _bundle(tmp_path / "m.safetensors", *encoders)
    data = _data(tmp_path)
    report = tmp_path / "report"
    code, stdout, err = _invoke(
        "evaluate",
        str(bundle),
        str(data),
        "--json",
        "--report-dir",
        str(report),
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert code == 0, err
    result = json.loads(stdout)
    rows = {name: s["rows"] for name, s in result["configurations"].items()}
    assert rows == {"both": 3, "text_only": 3, "image_only": 3, "as_given": 7}
    assert result["as_given_rows"] == {"both": 3, "text_only": 2, "image_only": 2}
    matrix = result["configurations"]["as_given"]["confusion"]
    assert sum(map(sum, matrix)) == 7 and len(matrix) == len(CLASSES)
    assert (report / "confusion.png").is_file() and (report / "report.md").is_file()
