"""Stable Diffusion recovery (eq. 6-7) through the real server over real gRPC on loopback, on
a tiny random checkpoint built here (CPU, no download): a mixed federation of a client holding
the checkpoint (paired + text-only rows) and one without it (feature recovery). Two rounds:
the SD client generates f^_i for its captions, trains Table I's text-only path on them,
fine-tunes attn2 + text projection and uploads exactly those deltas in chunks; FedAvg averages
them over that client alone; round 2 serves the generated features from the cache
(regenerate_every 2). A run that refuses clients without the checkpoint refuses at Register."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from crossfed.client.backoff import RetryPolicy
from crossfed.client.errors import FatalServerError
from crossfed.client.local_data import ClientModality, LocalData
from crossfed.client.local_trainer import TrainConfig
from crossfed.client.loop import ClientLoop, LoopSettings, Registered, RoundReport
from crossfed.client.round_worker import ModelMismatchError, ModelRoundWorker, WorkerSettings
from crossfed.client.sd_recovery_step import SDClientOptions, SDRecoveryStep
from crossfed.client.transport import CallDeadlines, ChannelSecurity, GrpcTransport
from crossfed.client.update_upload import LocalUpdate, default_encryptor_factory
from crossfed.common.config import ClientPrivacyConfig, ServerConfig
from crossfed.common.data.embedding_cache import EmbeddingCache
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.data.raw_dataset import RawDataset
from crossfed.common.model.encoders import SmallCNNImageEncoder
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet
from crossfed.common.model.sd_random_checkpoint import save_random_stable_diffusion
from crossfed.common.model.sd_trainable import (
    SD_MODULE,
    checkpoint_digest,
    spec_bytes,
    trainable_spec_of_checkpoint,
)
from crossfed.common.round_instructions import PLAIN, RoundInstructions
from crossfed.server.server_app import CoordinatorServer, ServerOptions

TEXT_DIM, CLASSES = 16, 3
CAPTIONS = (
    ("a red circle", "a small red circle"),
    ("a green square", "a big green square"),
    ("a blue cross", "a thin blue cross"),
)
COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 230]], dtype=np.int64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny")


@pytest.fixture(scope="module")
def encoder() -> SmallCNNImageEncoder:
    return SmallCNNImageEncoder.pretrained()


def model_config(checkpoint: Path, policy: str = "feature") -> ModelConfig:
    spec = trainable_spec_of_checkpoint(checkpoint)
    return ModelConfig.model_validate(
        {
            "text_dim": TEXT_DIM,
            "image_dim": 256,  # E_i: the shipped CNN, which also encodes the generated images
            "hidden_dim": 16,
            "num_classes": CLASSES,
            "diffusion_train_steps": 10,
            "memory_capacity": 8,
            "memory_top_k": 2,
            "recovery": "stable-diffusion",
            "stable_diffusion": {
                "checkpoint_digest": checkpoint_digest(checkpoint),
                "trainable": {k: list(v) for k, v in spec.items()},
                "clients_without_checkpoint": policy,
                "num_inference_steps": 2,
                "guidance_scale": 1.0,
                "finetune_steps": 2,
                "finetune_batch_size": 4,
                "regenerate_every": 2,
            },
        }
    )


def raw_rows(n: int, text_only: int, seed: int) -> RawDataset:
    """n rows cycling over the classes; the last `text_only` rows have no image."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % CLASSES
    noise = rng.integers(-25, 25, (n, 16, 16, 3))
    images = np.clip(COLOURS[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    has_image = np.arange(n) < n - text_only
    images[~has_image] = 0
    texts = [CAPTIONS[y][i % 2] for i, y in enumerate(labels.tolist())]
    return RawDataset(images, texts, labels.astype(np.int64), np.ones(n, bool), has_image)


def embed(raw: RawDataset, encoder: SmallCNNImageEncoder) -> EmbeddingSet:
    """f_t: a fixed random vector per caption; f_i: the CNN on the real images (eq. 1)."""
    vocab = sorted({t for pair in CAPTIONS for t in pair})
    table = torch.randn(len(vocab), TEXT_DIM, generator=torch.Generator().manual_seed(7))
    text = table[[vocab.index(t) for t in raw.texts]]
    has_image = torch.from_numpy(raw.has_image)
    image = encoder.encode(raw.images) * has_image[:, None]
    return EmbeddingSet(
        text=text,
        image=image,
        has_text=torch.ones(len(raw), dtype=torch.bool),
        has_image=has_image,
        labels=torch.from_numpy(raw.labels),
    )


def worker_settings(tmp: Path) -> WorkerSettings:
    return WorkerSettings(
        train=TrainConfig(epochs=1, batch_size=8, num_threads=1),
        privacy=ClientPrivacyConfig(projection_dp=False),
        state_dir=tmp,
    )


def sd_worker(
    checkpoint: Path, encoder: SmallCNNImageEncoder, tmp: Path
) -> tuple[ModelRoundWorker, EmbeddingCache]:
    train_raw, holdout_raw = raw_rows(12, text_only=4, seed=1), raw_rows(6, text_only=2, seed=2)
    data = LocalData(
        train=embed(train_raw, encoder),
        holdout=embed(holdout_raw, encoder),
        modality=ClientModality.BOTH,
        description="sd client",
        train_raw=train_raw,
        holdout_raw=holdout_raw,
    )
    cache = EmbeddingCache(tmp / "cache")
    step = SDRecoveryStep(
        SDClientOptions(checkpoint, "cpu"), "cpu", encoder, train_raw, holdout_raw, cache
    )
    return ModelRoundWorker(data, worker_settings(tmp), step), cache


def feature_worker(encoder: SmallCNNImageEncoder, tmp: Path) -> ModelRoundWorker:
    train, holdout = raw_rows(9, text_only=9, seed=3), raw_rows(3, text_only=3, seed=4)
    data = LocalData(
        train=embed(train, encoder),
        holdout=embed(holdout, encoder),
        modality=ClientModality.TEXT_ONLY,
        description="feature client",
    )
    return ModelRoundWorker(data, worker_settings(tmp))


class RecordingWorker:
    """Passes everything to the real worker and keeps each round's upload."""

    def __init__(self, worker: ModelRoundWorker) -> None:
        self.worker = worker
        self.updates: list[LocalUpdate] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.worker, name)

    def train(
        self,
        round_id: int,
        local_epochs: int | None,
        instructions: RoundInstructions = PLAIN,
    ) -> LocalUpdate:
        update = self.worker.train(round_id, local_epochs, instructions)
        self.updates.append(update)
        return update


@dataclass
class ClientThread:
    loop: ClientLoop
    transport: GrpcTransport
    reports: list[RoundReport]
    thread: threading.Thread
    error: list[BaseException]


def start_client(address: str, cid: str, worker: object, stop: threading.Event) -> ClientThread:
    transport = GrpcTransport.connect(
        address,
        ChannelSecurity(insecure=True),
        CallDeadlines(unary_s=30.0, heartbeat_s=30.0, transfer_s=60.0),
        client_id=cid,
    )
    reports: list[RoundReport] = []
    loop = ClientLoop(
        transport,
        worker,  # type: ignore[arg-type]
        LoopSettings(
            retry=RetryPolicy(initial_delay_s=0.05, max_delay_s=0.5, give_up_after_s=60.0),
            default_poll_s=0.05,
            chunk_size=8 * 1024,
        ),
        client_id=cid,
        encryptor_factory=default_encryptor_factory(),
        stop_event=stop,
        on_round=reports.append,
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            loop.run()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)
        finally:
            transport.close()

    thread = threading.Thread(target=run, name=f"client-{cid}", daemon=True)
    thread.start()
    return ClientThread(loop, transport, reports, thread, errors)


@pytest.fixture()
def server_for(tmp_path: Path) -> Iterator[object]:
    servers: list[CoordinatorServer] = []

    def make(model: ModelConfig, rounds: int) -> tuple[CoordinatorServer, str]:
        config = ServerConfig.model_validate(
            {
                "listen": "127.0.0.1:0",
                "state_dir": str(tmp_path / "state"),
                "model": model.model_dump(),
                "rounds": {"rounds": rounds, "min_clients": 2, "round_deadline_s": 120.0},
                "tls": {"insecure": True},
                "transport": {"chunk_size": 8 * 1024, "max_message_bytes": 1024 * 1024},
            }
        )
        options = ServerOptions(tick_interval_s=0.05, heartbeat_interval_ms=50)
        server = CoordinatorServer.create(config, options)
        servers.append(server)
        return server, f"127.0.0.1:{server.start()}"

    yield make
    for server in servers:
        server.stop()


def test_mixed_federation_round_trip(
    checkpoint: Path,
    encoder: SmallCNNImageEncoder,
    tmp_path: Path,
    server_for: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    externals: list[torch.Tensor] = []
    real_recover = CrossModalNet.recover_image

    def recording_recover(
        self: CrossModalNet,
        f_t: torch.Tensor,
        generator: torch.Generator | None = None,
        external: torch.Tensor | None = None,
        steps: int | None = None,
    ) -> torch.Tensor:
        if external is not None:
            externals.append(external.clone())
        return real_recover(self, f_t, generator, external, steps)

    monkeypatch.setattr(CrossModalNet, "recover_image", recording_recover)
    config = model_config(checkpoint)
    server, address = server_for(config, 2)  # type: ignore[operator]
    sd, cache = sd_worker(checkpoint, encoder, tmp_path / "sd")
    recorder = RecordingWorker(sd)
    stop = threading.Event()
    clients = [
        start_client(address, "sd-client", recorder, stop),
        start_client(address, "edge-client", feature_worker(encoder, tmp_path / "edge"), stop),
    ]
    try:
        for client in clients:
            client.thread.join(timeout=240)
    finally:
        stop.set()
    for client in clients:
        assert not client.error, repr(client.error)
        assert [r.round_id for r in client.reports] == [1, 2]

    # registration: the server runs SD on one client and feature recovery on the other
    registered = {
        e.client_id: e.values.get("stable_diffusion")
        for e in server.engine.store.events_after(0, 1000)
        if e.kind == "client_registered"
    }
    assert registered == {"sd-client": 1.0, "edge-client": 0.0}

    # eq. 6: round 1 generated every distinct caption once; round 2 served them from the cache
    first, second = (update.metrics for update in recorder.updates)
    local_captions = {t for raw in (sd.data.train_raw, sd.data.holdout_raw) for t in raw.texts}  # type: ignore[union-attr]
    assert first["sd_generated_images"] == len(local_captions) and first["sd_cache_hit"] == 0
    assert second["sd_generated_images"] == 0 and second["sd_cache_hit"] == 1
    assert cache.stats.hits >= 1
    assert "loss_sd_diff" in first and "loss_sd_denoise" in first  # eq. 7 on the pairs

    # Table I text-only path: the holdout's text rows were scored with the generated f^_i
    holdout = sd._holdout_set
    assert holdout.recovered_image is not None
    generated = holdout.recovered_image[holdout.has_text]
    assert float(generated.abs().sum()) > 0
    assert any(e.shape == generated.shape and torch.equal(e, generated) for e in externals)

    # upload: exactly the spec's deltas, on the chunked wire; the edge client sends none
    spec = config.stable_diffusion.trainable_spec()  # type: ignore[union-attr]
    from crossfed.common.wire.tensor_codec import decode_tensors

    sent = decode_tensors(recorder.updates[-1].payload)
    sd_sent = {k[len(SD_MODULE) + 1 :]: v for k, v in sent.items() if k.startswith(SD_MODULE)}
    assert set(sd_sent) == set(spec)
    assert recorder.updates[-1].module_samples[SD_MODULE] == 8  # paired training rows
    assert len(recorder.updates[-1].payload) > spec_bytes(spec) > 8 * 1024  # several chunks
    uploads = server.engine.store.list_uploads(2, 1)
    assert {u.client_id: u.module_samples.get(SD_MODULE) for u in uploads} == {
        "sd-client": 8,
        "edge-client": 0,
    }
    # FedAvg: the SD deltas are the SD client's alone (not diluted by the edge client)
    glob = server.engine.global_state
    for name, value in sd_sent.items():
        assert torch.allclose(glob[f"{SD_MODULE}.{name}"], value, atol=1e-7)
    assert any(float(v.abs().sum()) > 0 for v in sd_sent.values())


def test_sd_run_refuses_a_client_without_the_checkpoint_at_registration(
    checkpoint: Path, encoder: SmallCNNImageEncoder, tmp_path: Path, server_for: object
) -> None:
    _server, address = server_for(model_config(checkpoint, policy="refuse"), 1)  # type: ignore[operator]
    stop = threading.Event()
    client = start_client(address, "edge", feature_worker(encoder, tmp_path), stop)
    client.thread.join(timeout=60)
    stop.set()
    assert len(client.error) == 1 and isinstance(client.error[0], FatalServerError)
    message = str(client.error[0])
    assert "Register" in message and "this client has none" in message and "\n" not in message
    assert client.loop.stats.rounds_completed == []


def test_client_refuses_a_trainable_spec_its_checkpoint_does_not_have(
    checkpoint: Path, encoder: SmallCNNImageEncoder, tmp_path: Path
) -> None:
    config = model_config(checkpoint)
    sd = config.stable_diffusion
    assert sd is not None
    trainable = dict(sd.trainable)
    trainable.pop(next(iter(trainable)))
    wrong = config.model_copy(
        update={"stable_diffusion": sd.model_copy(update={"trainable": trainable})}
    )
    worker, _cache = sd_worker(checkpoint, encoder, tmp_path)
    with pytest.raises(ModelMismatchError, match="does not fit the run's trainable spec"):
        worker.on_registered(Registered("c", "r", 1, wrong.model_dump_json(), 1.0, 1024))
