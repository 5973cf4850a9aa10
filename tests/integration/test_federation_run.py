"""End to end on loopback, real processes: a coordination server and three client daemons
(text-only, image-only, both; Table I) run several rounds with encrypted uploads; the global
model's accuracy on every client's held-out data rises, and each client's inference path is
exercised. A second run kills a client in the middle of its upload: the round still completes
with the others once min_clients is met."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.ports import free_port

pytestmark = pytest.mark.integration  # starts real processes

HERE = Path(__file__).resolve().parent
ROUNDS = 3
MODALITIES = ("text_only", "image_only", "both")
PROCESS_TIMEOUT_S = 150.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three label-skewed shards of class-clustered embeddings with the default encoders'
    dimensions (384-d f_t, 256-d f_i), saved as EmbeddingSet files: the federation is under
    test here, not the frozen encoders (those have their own tests), so no encoder runs."""
    from crossfed.common.data.embeddings import EmbeddingSet
    from crossfed.common.data.label_partition import dirichlet_partition

    classes, n = 12, 720
    gen = torch.Generator().manual_seed(3)
    labels = torch.arange(n) % classes
    text_centres = torch.nn.functional.normalize(torch.randn(classes, 384, generator=gen), dim=1)
    image_centres = torch.nn.functional.normalize(torch.randn(classes, 256, generator=gen), dim=1)
    text = text_centres[labels] + 0.2 * torch.randn(n, 384, generator=gen)
    image = image_centres[labels] + 0.25 * torch.randn(n, 256, generator=gen)
    data = EmbeddingSet(
        text=text,
        image=image,
        has_text=torch.ones(n, dtype=torch.bool),
        has_image=torch.ones(n, dtype=torch.bool),
        labels=labels,
    )
    root = tmp_path_factory.mktemp("shards")
    parts = dirichlet_partition(labels.numpy(), 3, alpha=5.0, seed=3, min_samples=100)
    paths = []
    for index, part in enumerate(parts):
        path = root / f"shard{index}.safetensors"
        data.subset(np.sort(part)).save(path)
        paths.append(path)
    return paths


@dataclass
class Federation:
    root: Path
    port: int
    server: subprocess.Popen[str]
    server_log: Path

    def client_cmd(self, modality: str, shard: Path) -> list[str]:
        return [
            "client",
            "start",
            "--server",
            f"127.0.0.1:{self.port}",
            "--insecure",
            "--data",
            str(shard),
            "--modality",
            modality,
            "--state-dir",
            str(self.root / f"client_{modality}"),
            "--threads",
            "1",
            "--epochs",
            "4",
            "--batch-size",
            "32",
            "--no-progress",
            "--give-up-after",
            "60",
        ]

    def start_client(
        self, modality: str, shard: Path, script: Path | None = None, *extra: str
    ) -> subprocess.Popen[str]:
        args = [*self.client_cmd(modality, shard), *extra]
        head = [sys.executable, str(script)] if script else [sys.executable, "-m", "crossfed"]
        log = (self.root / f"{modality}.log").open("w")
        return subprocess.Popen(
            [*head, *(args[2:] if script else args)],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(),
        )

    def rounds_of(self, modality: str) -> list[dict[str, object]]:
        path = self.root / f"client_{modality}" / "rounds.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def log_of(self, modality: str) -> str:
        path = self.root / f"{modality}.log"
        return path.read_text() if path.exists() else ""

    def wait_for_log(self, names: tuple[str, ...], text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(text in self.log_of(name) for name in names):
            if time.monotonic() > deadline:
                pytest.fail(f"clients {names} never printed {text!r}\n{self.diagnostics()}")
            time.sleep(0.1)

    def diagnostics(self) -> str:
        parts = [f"--- server\n{self.server_log.read_text()[-3000:]}"]
        for modality in MODALITIES:
            parts.append(f"--- {modality}\n{self.log_of(modality)[-2000:]}")
        return "\n".join(parts)


def _start_server(
    root: Path, *flags: str, exit_when_done: bool = True, env: dict[str, str] | None = None
) -> Federation:
    port = free_port()
    log_path = root / "server.log"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "crossfed",
            "server",
            "start",
            "--state-dir",
            str(root / "server"),
            "--listen",
            f"127.0.0.1:{port}",
            "--insecure",
            "--heartbeat-ms",
            "200",
            *(["--exit-when-done"] if exit_when_done else []),
            "--log-level",
            "WARNING",
            *flags,
        ],
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        env={**_env(), **(env or {})},
    )
    return Federation(root, port, server, log_path)


def _wait(
    procs: dict[str, subprocess.Popen[str]], fed: Federation, stop_server: bool = True
) -> dict[str, int]:
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    codes: dict[str, int] = {}
    try:
        for name, proc in procs.items():
            codes[name] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        stop_server = True
        pytest.fail(f"federation did not finish in {PROCESS_TIMEOUT_S}s\n{fed.diagnostics()}")
    finally:
        for proc in [*procs.values(), *([fed.server] if stop_server else [])]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return codes


def _accuracy(record: dict[str, object], key: str) -> float:
    metrics = record["metrics"]
    assert isinstance(metrics, dict)
    return float(metrics.get(key, math.nan))


@pytest.mark.long  # over ~20 s on 2 cores: .ci/run's own stage
def test_three_modality_clients_federate_and_global_accuracy_rises(
    shards: list[Path], tmp_path: Path
) -> None:
    fed = _start_server(
        tmp_path, "--rounds", str(ROUNDS), "--min-clients", "3", "--round-deadline-s", "90"
    )
    clients = {
        modality: fed.start_client(modality, shard)
        for modality, shard in zip(MODALITIES, shards, strict=True)
    }
    codes = _wait({**clients, "server": fed.server}, fed)
    assert codes == {"text_only": 0, "image_only": 0, "both": 0, "server": 0}, fed.diagnostics()

    for modality in MODALITIES:
        records = fed.rounds_of(modality)
        assert [r["round"] for r in records] == list(range(1, ROUNDS + 1)), fed.diagnostics()
        assert all(r["encrypted"] for r in records), "uploads must be encrypted"
        assert f"round   {ROUNDS}" in fed.log_of(modality)  # the per-round CLI line
        for record in records:
            # This client's Table I path ran on its holdout (recovery for the missing slot).
            assert math.isfinite(_accuracy(record, f"global_acc_{modality}"))
            assert math.isfinite(_accuracy(record, f"local_acc_{modality}"))
            assert float(record["metrics"]["peak_rss_mib"]) > 0  # type: ignore[index]
        others = set(MODALITIES) - {modality, "both"} if modality != "both" else set()
        for other in others:  # a single-modality client cannot score the other path alone
            assert f"global_acc_{other}" not in records[0]["metrics"]  # type: ignore[operator]

    first = [_accuracy(fed.rounds_of(m)[0], f"global_acc_{m}") for m in MODALITIES]
    last = [_accuracy(fed.rounds_of(m)[-1], f"global_acc_{m}") for m in MODALITIES]
    # Round 1 scores the untrained initial model (chance is 1/12); the last round scores the
    # model aggregated from everyone's updates.
    assert sum(last) / 3 > sum(first) / 3 + 0.15, (first, last)
    assert all(b > a for a, b in zip(first, last, strict=True)), (first, last)


def _image_only_accuracy(state: dict[str, torch.Tensor], shards: list[Path]) -> float:
    from crossfed.common.data.embeddings import EmbeddingSet
    from crossfed.common.model.model_config import ModelConfig
    from crossfed.common.model.network import CrossModalNet

    model = CrossModalNet(
        ModelConfig(calibrate_image_classifier=True, calibrate_text_classifier=True)
    )
    model.load_shareable_state_dict(state)
    model.eval()
    correct = total = 0
    for path in shards:
        data = EmbeddingSet.load(path)
        with torch.no_grad():
            logits = model.predict(None, data.image)  # Table I image-only path
        correct += int((logits.argmax(1) == data.labels).sum())
        total += len(data)
    return correct / total


@pytest.mark.long  # over ~20 s on 2 cores: .ci/run's own stage
def test_calibration_round_after_training_fits_both_unimodal_paths(
    shards: list[Path], tmp_path: Path
) -> None:
    """With model.calibrate_image_classifier and calibrate_text_classifier the run ends with a
    calibration round: every client (each holds images or text) sends statistics of the
    final model, the server fits the image-only and the text-only last layers, and that
    model is the run's last checkpoint. The clients send exact
    statistics (a server without the projection-DP mandate, clients with --no-projection-dp):
    with DP noise, 240-row shards are too small for the fit and the server leaves the model
    uncalibrated (tests/common/privacy/test_calibration_dp.py)."""
    from crossfed.server.checkpoints import CheckpointStore
    from crossfed.server.server_app import CHECKPOINT_DIR

    rounds = 2
    fed = _start_server(
        tmp_path,
        "--rounds",
        str(rounds),
        "--min-clients",
        "3",
        "--round-deadline-s",
        "90",
        env={
            "CROSSFED_MODEL__CALIBRATE_IMAGE_CLASSIFIER": "true",
            "CROSSFED_MODEL__CALIBRATE_TEXT_CLASSIFIER": "true",
            "CROSSFED_PRIVACY__PROJECTION_DP": "false",
        },
    )
    clients = {
        modality: fed.start_client(modality, shard, None, "--no-projection-dp")
        for modality, shard in zip(MODALITIES, shards, strict=True)
    }
    codes = _wait({**clients, "server": fed.server}, fed)
    assert codes == {"text_only": 0, "image_only": 0, "both": 0, "server": 0}, fed.diagnostics()
    for modality in MODALITIES:
        expected = [1, 2, 3]
        assert [r["round"] for r in fed.rounds_of(modality)] == expected, fed.diagnostics()
        assert all(r["encrypted"] for r in fed.rounds_of(modality))
        assert [r["calibration"] for r in fed.rounds_of(modality)] == [r == 3 for r in expected]
    assert "calibration statistics sent" in fed.log_of("image_only")
    assert "calibration statistics sent" in fed.log_of("text_only")
    store = CheckpointStore(tmp_path / "server" / CHECKPOINT_DIR, keep_last=10)
    trained, calibrated = store.load(rounds), store.load(rounds + 1)
    assert not bool(trained["image_calibration.ready"])
    assert not bool(trained["text_calibration.ready"])
    for layer in ("image", "head", "text", "text_head"):
        assert bool(calibrated[f"{layer}_calibration.ready"]), layer
    shared = [k for k in trained if "_calibration." not in k]
    assert all(torch.equal(trained[k], calibrated[k]) for k in shared)
    before = _image_only_accuracy(trained, shards)
    after = _image_only_accuracy(calibrated, shards)
    assert after > 0.5 and after >= before - 0.02, (before, after)


def _admin(fed: Federation, *args: str, tolerate: bool = False) -> object:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "crossfed",
            "admin",
            "--insecure",
            "--server",
            f"127.0.0.1:{fed.port}",
            "--json",
            *args,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    if tolerate and out.returncode != 0:
        return None  # e.g. the server is still starting
    assert out.returncode == 0, f"admin {args}: {out.stderr}\n{fed.diagnostics()}"
    return json.loads(out.stdout)


@pytest.mark.long  # over ~20 s on 2 cores: .ci/run's own stage
def test_client_killed_mid_upload_round_completes_with_the_others(
    shards: list[Path], tmp_path: Path
) -> None:
    rounds = 2
    fed = _start_server(
        tmp_path,
        "--rounds",
        str(rounds),
        "--min-clients",
        "2",
        "--round-deadline-s",
        "60",
        "--wait-after-min-s",
        "1",
        "--client-timeout-s",
        "5",
        "--no-autostart",
        exit_when_done=False,
    )
    procs = {
        "text_only": fed.start_client("text_only", shards[0]),
        "both": fed.start_client("both", shards[2]),
        "image_only": fed.start_client(
            "image_only", shards[1], script=HERE.parent / "support" / "upload_killer_client.py"
        ),
    }
    # The run starts only once all three are registered, so round 1 selects all of them.
    deadline = time.monotonic() + 90
    while len(_admin(fed, "clients", tolerate=True) or ()) < 3:  # type: ignore[arg-type]
        if time.monotonic() > deadline:
            pytest.fail(f"clients did not register\n{fed.diagnostics()}")
        time.sleep(0.5)
    _admin(fed, "start")
    codes = _wait(
        {"image_only": procs["image_only"], "text_only": procs["text_only"], "both": procs["both"]},
        fed,
        stop_server=False,
    )
    try:
        history = _admin(fed, "rounds")
    finally:
        fed.server.terminate()
        try:
            fed.server.wait(20)
        except subprocess.TimeoutExpired:
            fed.server.kill()
            fed.server.wait(10)
    assert codes["image_only"] == 17, fed.diagnostics()  # died inside its upload stream
    assert "dying mid-upload" in fed.log_of("image_only")
    assert (codes["text_only"], codes["both"]) == (0, 0), fed.diagnostics()
    assert isinstance(history, list)
    first = [r for r in history if r["round"] == 1]
    # Round 1: all three selected, the killed client's partial upload never counted, the
    # round committed with the other two once min_clients (2) was met.
    assert [(r["state"], r["selected"], r["received"]) for r in first] == [("committed", 3, 2)], (
        history
    )
    assert sorted(r["round"] for r in history if r["state"] == "committed") == [1, 2]
    for modality in ("text_only", "both"):
        assert [r["round"] for r in fed.rounds_of(modality)] == [1, 2], fed.diagnostics()
