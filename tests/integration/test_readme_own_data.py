"""The README's "Your own data" walkthrough, run exactly as written (the commands are read out
of README.md, not copied) on a generated folder of pictures and captions that reaches the
model only through the manifest loader: a federation trains, the model bundle is exported,
`crossfed evaluate` reports what the library computes for that model on that data, and
`crossfed predict` answers every row on the right Table I path."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from crossfed.common.data.embedding_cache import encode_dataset
from crossfed.common.data.manifest import load_manifest
from crossfed.common.model.encoders import build_image_encoder, build_text_encoder
from crossfed.common.model.evaluation import evaluate
from crossfed.common.model.model_bundle import load_bundle

from tests.support.photo_manifest import CLASSES, write_photo_dataset

README = Path(__file__).resolve().parents[2] / "README.md"
pytestmark = pytest.mark.integration


def readme_walkthrough() -> str:
    """The first bash block of the README's "Your own data" section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Your own data\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the README's 'Your own data' section has no bash block"
    return match.group(1)


def run_script(script: str, cwd: Path, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """bash -e over the script with the venv's `crossfed` first on PATH; the whole process
    group is killed if it overruns (no server left behind)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the README walkthrough overran {timeout_s:.0f} s:\n{out[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything it left running
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.mark.long  # over ~20 s on 2 cores: .ci/run's own stage
def test_readme_walkthrough_from_pictures_to_predictions(tmp_path: Path) -> None:
    data = write_photo_dataset(tmp_path / "my-data", rows_per_site=120, seed=3)
    result = run_script(readme_walkthrough(), tmp_path, timeout_s=420)
    assert result.returncode == 0, result.stdout[-6000:]
    out = result.stdout

    bundle = load_bundle(tmp_path / "model.safetensors")
    assert bundle.class_names == CLASSES and bundle.round == 5
    assert bundle.text_encoder is not None and bundle.image_encoder is not None
    assert bundle.prototypes is not None  # text-only inference has its VLMR entries

    # evaluate reports the model's own figures: the library's evaluate() on the same rows,
    # loaded and encoded the way a client does
    report = json.loads((tmp_path / "evaluation-test" / "evaluation.json").read_text())
    raw = load_manifest(data / "test.csv", class_names=CLASSES, image_size=32).dataset
    encoded = encode_dataset(raw, build_text_encoder("minilm"), build_image_encoder("cnn"))
    expected = evaluate(bundle.build_model(), encoded)
    for config in ("both", "text_only", "image_only"):
        got = report["configurations"][config]
        assert got["rows"] == len(raw)
        assert got["accuracy"] == pytest.approx(expected[config]["accuracy"], abs=1e-9)
        assert got["macro_f1"] == pytest.approx(expected[config]["macro_f1"], abs=1e-9)
        assert re.search(rf"^{config}\s+{len(raw)}\s+{got['accuracy']:.3f}\s", out, re.MULTILINE), (
            out
        )
    assert report["configurations"]["as_given"]["accuracy"] == pytest.approx(
        report["configurations"]["both"]["accuracy"]
    )  # every test row holds both modalities
    assert expected["both"]["accuracy"] > 0.6, expected  # it learned: chance is 0.2
    assert (tmp_path / "evaluation-test" / "confusion.png").stat().st_size > 1000

    # predict: one row per input row, each on the path its cells call for
    with (tmp_path / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    with (data / "new.csv").open(newline="") as fh:
        inputs = list(csv.DictReader(fh))
    assert len(rows) == len(inputs) == 16
    for row, given in zip(rows, inputs, strict=True):
        assert row["predicted"] in CLASSES and 0 < float(row["probability"]) <= 1
        assert row["top_k"].split(";")[0].split(":")[0] == row["predicted"]
        want = (
            "both"
            if given["image"] and given["text"]
            else ("image_only" if given["image"] else "text_only")
        )
        assert row["path"].split(":")[0] == want, row
        assert row["error"] == ""
