"""CCVR for the image-only path (`ModelConfig.calibrate_image_classifier`): exact pooled
class statistics, the server-side refit of label-skew-biased last layers, image-only rows
only, and calibration layers that clients never train and FedAvg never averages."""

from __future__ import annotations

import pytest
import torch
from crossfed.client.local_trainer import TrainConfig, module_samples_of, train_local
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.classifier_calibration import (
    FeatureStats,
    calibrate_last_layers,
    calibrated_state,
    calibration_stats,
    check_client_stats,
    image_only_hidden,
    stats_from_tensors,
    stats_shapes,
    stats_to_tensors,
)
from crossfed.common.model.model_errors import ModelInputError
from crossfed.common.model.network import CrossModalNet, Recovery
from crossfed.server.aggregation import StreamingFedAvg, module_weights_of

from tests.support.small_model import tiny_network_config

CFG = tiny_network_config(calibrate_image_classifier=True)


def clustered(n: int, seed: int, labels: torch.Tensor | None = None) -> EmbeddingSet:
    """Paired rows whose image features sit around a per-class centre (separable classes)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3 if labels is None else labels
    centres = 3.0 * torch.eye(3, 8)
    return EmbeddingSet(
        text=torch.randn(n, 12, generator=gen),
        image=centres[y] + 0.5 * torch.randn(n, 8, generator=gen),
        has_text=torch.ones(n, dtype=torch.bool),
        has_image=torch.ones(n, dtype=torch.bool),
        labels=y,
    )


def test_summed_client_stats_give_the_pooled_class_moments() -> None:
    torch.manual_seed(0)
    model = CrossModalNet(CFG).eval()
    a, b = clustered(30, 1), clustered(45, 2)
    summed = calibration_stats(model, a) + calibration_stats(model, b)
    pooled = EmbeddingSet(
        text=torch.cat([a.text, b.text]),
        image=torch.cat([a.image, b.image]),
        has_text=torch.cat([a.has_text, b.has_text]),
        has_image=torch.cat([a.has_image, b.has_image]),
        labels=torch.cat([a.labels, b.labels]),
    )
    with torch.no_grad():
        body = model.image_classifier[:-1](pooled.image).double()
        hidden = image_only_hidden(model, pooled.image).double()
        # the head's input at image-only inference is what image_only_hidden builds
        assert torch.allclose(
            model.head(hidden.float()),
            model.classify(
                torch.zeros(len(pooled), 12),
                pooled.image,
                torch.zeros(len(pooled), dtype=torch.bool),
                pooled.has_image,
                Recovery(model.recover_text(pooled.image), torch.zeros_like(pooled.image)),
            ),
            atol=1e-5,
        )
    for part, feats in ((summed.parts["classifier"], body), (summed.parts["head"], hidden)):
        present, mean, cov = part.gaussians(ridge=0.0)
        assert present.tolist() == [0, 1, 2]
        for c in range(3):
            fc = feats[pooled.labels == c]
            assert int(part.count[c]) == len(fc)
            assert torch.allclose(mean[c], fc.mean(0), atol=1e-8)
            assert torch.allclose(cov[c], torch.cov(fc.T), atol=1e-8)
    with pytest.raises(ModelInputError, match="shapes"):
        FeatureStats(part.count, part.total, part.outer[:, :2])


def test_calibration_undoes_a_skewed_last_layer_for_image_only_rows_only() -> None:
    torch.manual_seed(0)
    model = CrossModalNet(CFG)
    train_local(model, clustered(300, 0), TrainConfig(epochs=5, batch_size=32, lr=2e-3, seed=0))
    test = clustered(150, 9)
    # Label skew: clients holding mostly class 0 leave its logit inflated in the FedAvg'd
    # last layers (image classifier and fusion head).
    with torch.no_grad():
        model.image_classifier[-1].bias[0] += 8.0
        model.head.bias[0] += 8.0
    model.eval()

    def acc(logits: torch.Tensor) -> float:
        return float((logits.argmax(1) == test.labels).float().mean())

    def fusion_image_only() -> torch.Tensor:
        model.config.unimodal_ensemble = False
        try:
            return model.predict(None, test.image)
        finally:
            model.config.unimodal_ensemble = True

    skewed = acc(model.predict(None, test.image))
    assert skewed < 0.5  # mostly class 0
    assert acc(model.image_logits(test.image)) < 0.5
    assert acc(fusion_image_only()) < 0.5
    paired_before = model.predict(test.text, test.image)
    text_before = model.predict(test.text, None)
    assert model.image_calibration is not None and not bool(model.image_calibration.ready)
    stats = calibration_stats(model, clustered(90, 3)) + calibration_stats(model, clustered(90, 4))
    assert calibrate_last_layers(model, stats, ("image",), samples_per_class=200, steps=100) == [
        "image"
    ]
    assert model.head_calibration is not None and bool(model.head_calibration.ready)
    assert acc(model.image_logits(test.image)) > 0.9
    assert acc(fusion_image_only()) > 0.9
    assert acc(model.predict(None, test.image)) > 0.9 > skewed
    # Text-only rows keep the federated last layers; paired rows keep the fusion head and
    # read the image classifier through its calibrated layer in the paired ensemble.
    assert torch.equal(model.predict(test.text, None), text_before)
    assert acc(model.predict(test.text, test.image)) >= acc(paired_before)


def test_calibration_layer_is_not_trained_by_clients_nor_averaged() -> None:
    data = clustered(40, 0)
    model = CrossModalNet(CFG)
    assert model.image_calibration is not None
    assert not list(model.image_calibration.parameters())  # buffers: no optimizer sees them
    assert module_samples_of(model, data, 1)["image_calibration"] == 0
    start = model.shareable_state_dict()
    fold = StreamingFedAvg(start, CrossModalNet.module_of)
    result = train_local(model, data, TrainConfig(epochs=1, batch_size=8))
    with torch.no_grad():  # even a client that changed it cannot move the global value
        model.image_calibration.weight.add_(1.0)
        model.image_calibration.ready.fill_(True)
    weights = module_weights_of(result.num_samples, result.module_samples, fold.modules)
    fold.add(model.shareable_state_dict(), weights, result.num_samples)
    out = fold.result()
    for module in ("image_calibration", "head_calibration"):
        assert module_samples_of(model, data, 1)[module] == 0
        for key in ("weight", "bias", "ready"):
            assert torch.equal(out[f"{module}.{key}"], start[f"{module}.{key}"])
    assert not bool(out["image_calibration.ready"])


def test_flag_off_has_no_calibration_layer_and_same_initialisation() -> None:
    torch.manual_seed(0)
    on = CrossModalNet(CFG)
    torch.manual_seed(0)
    off = CrossModalNet(CFG.model_copy(update={"calibrate_image_classifier": False}))
    assert off.image_calibration is None and off.head_calibration is None
    on_state, off_state = on.shareable_state_dict(), off.shareable_state_dict()
    assert set(on_state) - set(off_state) == {
        f"{m}.{k}"
        for m in ("image_calibration", "head_calibration")
        for k in ("weight", "bias", "ready")
    }
    assert all(torch.equal(v, on_state[k]) for k, v in off_state.items())
    with pytest.raises(ModelInputError, match="no image-path calibration layers"):
        calibrate_last_layers(off, calibration_stats(off, clustered(30, 0)), ("image",))


def test_wire_statistics_roundtrip_match_the_spec_and_are_checked() -> None:
    """What a client uploads in the calibration round: the tensors of `stats_shapes`, whole
    counts adding up to the rows it declares, and nothing for classes it does not hold."""
    model = CrossModalNet(CFG).eval()
    data = clustered(20, 4, labels=torch.tensor([0, 1] * 10))  # class 2 absent
    tensors = stats_to_tensors(calibration_stats(model, data))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == stats_shapes(CFG)
    assert float(tensors["noise.outer_var"]) == 0.0  # exact statistics
    assert all(v.dtype == torch.float64 for v in tensors.values())
    back = stats_from_tensors(tensors)
    assert torch.equal(back.parts["head"].outer, tensors["head.outer"])
    check_client_stats(tensors, 20)
    with pytest.raises(ModelInputError, match="declares num_samples=21 but its paths count 20"):
        check_client_stats(tensors, 21)
    with pytest.raises(ModelInputError, match="adds up to 20 rows"):
        check_client_stats(tensors, 19)  # more rows than it declared
    bad = {**tensors, "classifier.count": tensors["classifier.count"] + 0.5}
    with pytest.raises(ModelInputError, match="whole numbers"):
        check_client_stats(bad, 20)
    ghost = dict(tensors)
    ghost["head.sum"] = ghost["head.sum"].clone()
    ghost["head.sum"][2] = 1.0  # sums for a class with count 0
    with pytest.raises(ModelInputError, match="count 0"):
        check_client_stats(ghost, 20)
    negative = dict(tensors)
    negative["classifier.outer"] = -negative["classifier.outer"]
    with pytest.raises(ModelInputError, match="negative diagonal"):
        check_client_stats(negative, 20)
    with pytest.raises(ModelInputError, match="lack"):
        stats_from_tensors({k: v for k, v in tensors.items() if k != "head.count"})


def test_server_fit_marks_the_layers_ready_and_keeps_the_rest() -> None:
    torch.manual_seed(1)
    model = CrossModalNet(CFG).eval()
    state = model.shareable_state_dict()
    fitted, what = calibrated_state(CFG, state, calibration_stats(model, clustered(60, 5)))
    assert fitted is not None and set(fitted) == set(state) and what.endswith("fitted")
    assert bool(fitted["image_calibration.ready"]) and bool(fitted["head_calibration.ready"])
    assert not torch.equal(fitted["image_calibration.weight"], state["image_calibration.weight"])
    untouched = [k for k in state if not k.split(".")[0].endswith("_calibration")]
    assert all(torch.equal(fitted[k], state[k]) for k in untouched)
    one_class = clustered(10, 6, labels=torch.zeros(10, dtype=torch.long))
    assert calibrated_state(CFG, state, calibration_stats(model, one_class))[0] is None
