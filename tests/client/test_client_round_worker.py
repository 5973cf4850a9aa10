"""ModelRoundWorker and ProjectionReleaser on a tiny network and random embeddings: the update
has exactly the global model's keys, metrics cover the client's Table I path, bad global
weights are refused clearly, and DP projection releases are accounted and budgeted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from crossfed.client.errors import PrivacyBudgetExhaustedError
from crossfed.client.local_data import ClientModality, LocalData
from crossfed.client.local_trainer import TrainConfig
from crossfed.client.loop import Registered
from crossfed.client.projection_release import ACCOUNTANT_FILE, ProjectionReleaser
from crossfed.client.round_worker import ModelMismatchError, ModelRoundWorker, WorkerSettings
from crossfed.common.config import ClientPrivacyConfig
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet
from crossfed.common.privacy.projection_dp import ProjectionDPParams, ProjectionMandate
from crossfed.common.wire.tensor_codec import decode_tensors, encode_tensors

CONFIG = ModelConfig(
    text_dim=16,
    image_dim=12,
    hidden_dim=16,
    num_classes=3,
    diffusion_train_steps=10,
    diffusion_sample_steps=2,
    memory_capacity=8,
    memory_top_k=2,
)


def _embeddings(n: int, modality: ClientModality, seed: int) -> EmbeddingSet:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CONFIG.num_classes
    text = torch.randn(n, CONFIG.text_dim, generator=gen) + labels[:, None].float()
    image = torch.randn(n, CONFIG.image_dim, generator=gen) - labels[:, None].float()
    has_text = torch.full((n,), modality is not ClientModality.IMAGE_ONLY)
    has_image = torch.full((n,), modality is not ClientModality.TEXT_ONLY)
    return EmbeddingSet(
        text=text * has_text[:, None],
        image=image * has_image[:, None],
        has_text=has_text,
        has_image=has_image,
        labels=labels,
    )


def _worker(
    modality: ClientModality, tmp_path: Path, privacy: ClientPrivacyConfig | None = None
) -> ModelRoundWorker:
    data = LocalData(
        train=_embeddings(30, modality, 0),
        holdout=_embeddings(9, modality, 1),
        modality=modality,
        description="tiny",
    )
    settings = WorkerSettings(
        train=TrainConfig(epochs=1, batch_size=8, num_threads=1),
        privacy=privacy or ClientPrivacyConfig(),
        state_dir=tmp_path,
    )
    worker = ModelRoundWorker(data, settings)
    worker.on_registered(Registered("c", "r", 1, CONFIG.model_dump_json(), 1.0, 1024))
    return worker


@pytest.mark.parametrize("modality", list(ClientModality))
def test_round_produces_update_with_global_keys_and_table1_metrics(
    modality: ClientModality, tmp_path: Path
) -> None:
    worker = _worker(modality, tmp_path)
    global_state = CrossModalNet(CONFIG).shareable_state_dict()
    worker.load_global(1, encode_tensors(global_state))
    update = worker.train(1, local_epochs=2)
    received = decode_tensors(update.payload)
    assert set(received) == set(global_state)
    assert all(received[k].shape == global_state[k].shape for k in global_state)
    assert any(not torch.equal(received[k], global_state[k]) for k in global_state)  # trained
    assert update.num_samples == 30
    assert all(0 <= n <= 30 for n in update.module_samples.values())
    own = modality.value
    assert math.isfinite(update.metrics[f"global_acc_{own}"])
    assert math.isfinite(update.metrics[f"local_acc_{own}"])
    assert update.metrics["peak_rss_mib"] > 0
    registration = worker.registration()
    assert registration.num_samples == 30 and registration.modality == modality.proto


def test_a_writable_download_buffer_is_decoded_in_place_without_aliasing(
    tmp_path: Path,
) -> None:
    """load_global decodes the download's writable buffer zero-copy; the model must still own
    its weights, so reusing or freeing that buffer afterwards cannot change the model."""
    worker = _worker(ClientModality.BOTH, tmp_path)
    global_state = {k: v + 0.5 for k, v in CrossModalNet(CONFIG).shareable_state_dict().items()}
    buffer = bytearray(encode_tensors(global_state))
    worker.load_global(1, memoryview(buffer))
    buffer[-4096:] = bytes(4096)  # overwrite the tail, where the last tensors' bytes are
    loaded = worker._require_model().shareable_state_dict()
    assert all(torch.equal(loaded[k], global_state[k]) for k in global_state)


def test_text_only_client_never_trains_the_mapper(tmp_path: Path) -> None:
    worker = _worker(ClientModality.TEXT_ONLY, tmp_path)
    worker.load_global(1, encode_tensors(CrossModalNet(CONFIG).shareable_state_dict()))
    update = worker.train(1, None)
    assert update.module_samples.get("mapper", 0) == 0  # eq. 15: must not dilute the mapper


def test_mismatching_global_weights_are_refused_with_a_message(tmp_path: Path) -> None:
    worker = _worker(ClientModality.BOTH, tmp_path)
    other = ModelConfig(**{**CONFIG.model_dump(), "hidden_dim": 8})
    with pytest.raises(ModelMismatchError, match="round 4"):
        worker.load_global(4, encode_tensors(CrossModalNet(other).shareable_state_dict()))
    with pytest.raises(ModelMismatchError, match="round 5"):
        worker.load_global(5, b"not safetensors")


def test_server_model_with_other_dims_is_refused(tmp_path: Path) -> None:
    worker = _worker(ClientModality.BOTH, tmp_path)
    wide = ModelConfig(**{**CONFIG.model_dump(), "text_dim": 32})
    with pytest.raises(ModelMismatchError, match="text_dim=32"):
        worker.on_registered(Registered("c", "r", 1, wide.model_dump_json(), 1.0, 1024))


def test_received_prototypes_reach_the_next_training(tmp_path: Path) -> None:
    worker = _worker(ClientModality.TEXT_ONLY, tmp_path, ClientPrivacyConfig(projection_dp=False))
    worker.load_global(1, encode_tensors(CrossModalNet(CONFIG).shareable_state_dict()))
    worker.train(1, None)
    release = worker.projections(1)
    assert release is not None
    worker.receive_prototypes(1, release.payload)
    assert worker.prototypes is not None
    assert worker.prototypes.num_classes == CONFIG.num_classes
    worker.receive_prototypes(2, b"garbage")  # ignored with a warning, previous ones kept
    assert worker.prototypes is not None


def test_dp_release_hides_values_counts_presence_and_accounts_epsilon(tmp_path: Path) -> None:
    privacy = ClientPrivacyConfig(
        projection_dp=True, clip=1.0, noise_multiplier=1.0, delta=1e-5, epsilon_budget=None
    )
    model = CrossModalNet(CONFIG)
    data = _embeddings(30, ClientModality.TEXT_ONLY, 0)
    releaser = ProjectionReleaser(privacy, tmp_path)
    first = releaser.release(model, data)
    second = releaser.release(model, data)
    assert first is not None and second is not None
    assert 0 < first.epsilon_spent < second.epsilon_spent
    tensors = decode_tensors(first.payload)
    assert torch.equal(tensors["text_count"], torch.ones(CONFIG.num_classes))
    assert torch.equal(tensors["image_count"], torch.zeros(CONFIG.num_classes))
    assert torch.equal(tensors["image_sum"], torch.zeros_like(tensors["image_sum"]))
    exact = (data.text[data.labels == 0]).mean(0)
    assert not torch.allclose(tensors["text_sum"][0], exact, atol=1e-3)  # noised
    # The accountant survives a restart: epsilon continues, never restarts from zero.
    assert (tmp_path / ACCOUNTANT_FILE).exists()
    again = ProjectionReleaser(privacy, tmp_path)
    assert again.epsilon() == pytest.approx(second.epsilon_spent)


def test_dp_release_stops_at_the_epsilon_budget(tmp_path: Path) -> None:
    model = CrossModalNet(CONFIG)
    data = _embeddings(30, ClientModality.BOTH, 0)
    probe = ProjectionReleaser(ClientPrivacyConfig(noise_multiplier=1.0, epsilon_budget=None), None)
    one = probe.release(model, data)
    assert one is not None
    budget = one.epsilon_spent * 1.5  # room for exactly one release
    releaser = ProjectionReleaser(
        ClientPrivacyConfig(noise_multiplier=1.0, epsilon_budget=budget), None
    )
    assert releaser.release(model, data) is not None
    assert releaser.release(model, data) is None
    assert releaser.epsilon() <= budget


def test_dp_sgd_round_reports_epsilon_and_leaves_unused_modules_alone(tmp_path: Path) -> None:
    privacy = ClientPrivacyConfig(dp_sgd=True, dp_sgd_target_epsilon=3.0)
    worker = _worker(ClientModality.TEXT_ONLY, tmp_path, privacy)
    global_state = CrossModalNet(CONFIG).shareable_state_dict()
    worker.load_global(1, encode_tensors(global_state))
    first = worker.train(1, local_epochs=1)
    assert 0 < first.metrics["dp_sgd_epsilon_round"] <= 3.0
    assert first.metrics["dp_sgd_noise_multiplier"] > 0
    # exact losses and holdout accuracies are not DP-protected: shown locally, never uploaded
    leaky = ("loss_", "local_acc", "global_acc", "local_f1", "global_f1")
    assert not [k for k in first.metrics if k.startswith(leaky)]
    assert "loss_cls" in first.local_metrics and "local_acc_text_only" in first.local_metrics
    received = decode_tensors(first.payload)
    mapper_keys = [k for k in global_state if k.startswith("mapper.")]
    assert mapper_keys and all(torch.equal(received[k], global_state[k]) for k in mapper_keys)
    assert not torch.equal(received["head.weight"], global_state["head.weight"])
    second = worker.train(2, local_epochs=1)
    assert second.metrics["dp_sgd_epsilon_total"] > first.metrics["dp_sgd_epsilon_total"]
    assert (tmp_path / "dp_sgd_accountant.json").exists()


def test_dp_sgd_stops_before_a_round_would_pass_the_epsilon_budget(tmp_path: Path) -> None:
    privacy = ClientPrivacyConfig(dp_sgd=True, dp_sgd_target_epsilon=3.0, dp_sgd_epsilon_budget=3.5)
    worker = _worker(ClientModality.BOTH, tmp_path, privacy)
    worker.load_global(1, encode_tensors(CrossModalNet(CONFIG).shareable_state_dict()))
    first = worker.train(1, local_epochs=1)
    assert first.metrics["dp_sgd_epsilon_total"] <= 3.5
    ledger = (tmp_path / "dp_sgd_accountant.json").read_text()
    with pytest.raises(PrivacyBudgetExhaustedError, match="budget 3.5 reached"):
        worker.train(2, local_epochs=1)
    assert (tmp_path / "dp_sgd_accountant.json").read_text() == ledger  # nothing spent


def test_calibration_stats_cover_the_image_rows_and_decline_under_dp_sgd(
    tmp_path: Path,
) -> None:
    """The calibration round's upload: statistics of the loaded model on the rows holding an
    image (num_samples = those rows); a DP-SGD client sends zeros, and a model without
    calibration layers cannot be asked for them."""
    from crossfed.common.model.classifier_calibration import stats_shapes

    config = CONFIG.model_copy(update={"calibrate_image_classifier": True})
    for modality, rows in ((ClientModality.BOTH, 30), (ClientModality.TEXT_ONLY, 0)):
        worker = _worker(modality, tmp_path / modality.value)
        worker.on_registered(Registered("c", "r", 1, config.model_dump_json(), 1.0, 1024))
        worker.load_global(3, encode_tensors(CrossModalNet(config).shareable_state_dict()))
        update = worker.calibration_stats(3)
        sent = decode_tensors(update.payload)
        assert {k: tuple(v.shape) for k, v in sent.items()} == stats_shapes(config)
        assert update.num_samples == rows == int(sent["head.count"].sum())
        assert bool(sent["head.outer"].any()) == (rows > 0)

    private = _worker(ClientModality.BOTH, tmp_path / "dp", ClientPrivacyConfig(dp_sgd=True))
    private.on_registered(Registered("c", "r", 1, config.model_dump_json(), 1.0, 1024))
    update = private.calibration_stats(3)
    assert update.num_samples == 0
    assert not any(bool(t.any()) for t in decode_tensors(update.payload).values())

    plain = _worker(ClientModality.BOTH, tmp_path / "plain")
    with pytest.raises(ModelMismatchError, match="calibration"):
        plain.calibration_stats(3)


def test_calibration_stats_are_noised_and_accounted_under_projection_dp(tmp_path: Path) -> None:
    config = CONFIG.model_copy(update={"calibrate_image_classifier": True})
    global_bytes = encode_tensors(CrossModalNet(config).shareable_state_dict())
    sent = {}
    for name, privacy in (
        ("exact", ClientPrivacyConfig(projection_dp=False)),
        ("noised", ClientPrivacyConfig(noise_multiplier=1.0)),
        ("over_budget", ClientPrivacyConfig(noise_multiplier=1.0, epsilon_budget=1e-3)),
    ):
        worker = _worker(ClientModality.BOTH, tmp_path / name, privacy)
        worker.on_registered(Registered("c", "r", 1, config.model_dump_json(), 1.0, 1024))
        worker.load_global(3, global_bytes)
        update = worker.calibration_stats(3)
        sent[name] = (update, decode_tensors(update.payload))
    exact, noised = sent["exact"][1], sent["noised"][1]
    assert exact["head.count"].tolist() == [10.0, 10.0, 10.0]  # 30 rows, labels i % 3
    assert sent["noised"][0].num_samples == 30 == int(noised["head.count"].sum())
    assert not torch.allclose(noised["head.sum"], exact["head.sum"])
    assert sent["noised"][0].metrics["calibration_dp_epsilon_total"] > 0
    assert (tmp_path / "noised" / ACCOUNTANT_FILE).exists()  # spent with the projections
    assert sent["over_budget"][0].num_samples == 0  # nothing released past the budget


def test_the_servers_mandate_tightens_the_local_privacy_settings() -> None:
    own = ClientPrivacyConfig(projection_dp=False, noise_multiplier=8.0, epsilon_budget=None)
    releaser = ProjectionReleaser(own, None)
    releaser.adopt(ProjectionMandate(5.0, 0.5, 1e-6, 20.0))
    settings = releaser.privacy
    assert settings.projection_dp and settings.clip == 0.5 and settings.delta == 1e-6
    assert settings.noise_multiplier == 8.0  # more noise than mandated is kept
    assert settings.epsilon_budget == 20.0
    release = releaser.release(CrossModalNet(CONFIG), _embeddings(30, ClientModality.BOTH, 0))
    assert release is not None and release.mechanism == ProjectionDPParams(0.5, 8.0)
    # a paired client's release is two Gaussian releases: its text and its image rows
    assert releaser.accountant.total_steps == 2
    releaser.adopt(None)
    assert releaser.privacy == own
