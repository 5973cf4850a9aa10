"""CCVR on the text-only path (`ModelConfig.calibrate_text_classifier`): statistics of the
text classifier's body and of the head on the text-only view, taken as the served model
recovers f^_i, a refit that fixes text-only rows and leaves the others alone, the DP bound of
a release over both paths, and a federation that calibrates both paths."""

from __future__ import annotations

import math

import pytest
import torch
from crossfed.client.local_trainer import TrainConfig, train_local
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.classifier_calibration import (
    calibrate_last_layers,
    calibrated_state,
    calibration_stats,
    check_client_stats,
    covered_rows,
    served_model,
    stats_shapes,
    stats_to_tensors,
    text_only_hidden,
)
from crossfed.common.model.model_errors import ModelInputError
from crossfed.common.model.network import CrossModalNet
from crossfed.common.privacy.calibration_dp import (
    PATH_SENSITIVITY,
    CalibrationDPParams,
    privatize_calibration_stats,
)

from tests.support.small_model import tiny_network_config

CFG = tiny_network_config(calibrate_image_classifier=True, calibrate_text_classifier=True)


def mixed(n: int, seed: int, labels: torch.Tensor | None = None) -> EmbeddingSet:
    """Separable classes in both modalities; a third of the rows (at random) each paired,
    text-only and image-only (a single row is paired)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3 if labels is None else labels
    kind = torch.randperm(n, generator=gen) % 3
    has_t, has_i = kind != 2, kind != 1
    text = 3.0 * torch.eye(3, 12)[y] + 0.5 * torch.randn(n, 12, generator=gen)
    image = 3.0 * torch.eye(3, 8)[y] + 0.5 * torch.randn(n, 8, generator=gen)
    return EmbeddingSet(text * has_t[:, None], image * has_i[:, None], has_t, has_i, y)


def test_each_path_counts_the_rows_holding_its_modality() -> None:
    torch.manual_seed(0)
    model = CrossModalNet(CFG)
    data = mixed(30, 1)
    stats = calibration_stats(model, data)
    assert stats.paths == ("image", "text")
    assert stats.rows("image") == int(data.has_image.sum()) == 20
    assert stats.rows("text") == int(data.has_text.sum()) == 20
    assert covered_rows(model, data) == 30
    tensors = stats_to_tensors(stats)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == stats_shapes(CFG)
    check_client_stats(tensors, 30, ("image", "text"))
    unequal = {**tensors, "text_head.count": tensors["text_head.count"] * 0}
    unequal["text_head.sum"] = unequal["text_head.sum"] * 0
    unequal["text_head.outer"] = unequal["text_head.outer"] * 0
    with pytest.raises(ModelInputError, match="text path's two parts count different rows"):
        check_client_stats(unequal, 30, ("image", "text"))
    # the head part is the head's input on the text-only view of the served model
    rows = data.has_text.nonzero().squeeze(1)
    with torch.no_grad():
        hidden = text_only_hidden(served_model(model, None), data.text[rows]).double()
    assert torch.allclose(stats.parts["text_head"].total.sum(0), hidden.sum(0), atol=1e-6)


def test_a_rows_statistics_do_not_depend_on_the_rest_of_its_batch() -> None:
    """f^_i of a text-only row comes from that row's own noise, so statistics summed over
    single rows equal the batch's: what the per-sample DP bound needs."""
    torch.manual_seed(0)
    model = CrossModalNet(CFG.model_copy(update={"calibrate_image_classifier": False}))
    data = mixed(12, 2)
    whole = calibration_stats(model, data)
    one_by_one = calibration_stats(model, data, batch_size=1)
    for name, part in whole.parts.items():
        assert torch.allclose(part.total, one_by_one.parts[name].total, atol=1e-5), name
        assert torch.allclose(part.outer, one_by_one.parts[name].outer, atol=1e-5), name


def test_text_calibration_undoes_a_skewed_last_layer_and_leaves_image_only_rows() -> None:
    torch.manual_seed(0)
    model = CrossModalNet(CFG)
    train_local(model, mixed(300, 0), TrainConfig(epochs=5, batch_size=32, lr=2e-3, seed=0))
    test = mixed(150, 9)
    with torch.no_grad():  # label skew left class 0's logit inflated in both last layers
        model.text_classifier[-1].bias[0] += 8.0
        model.head.bias[0] += 8.0
    model.eval()
    text_rows, image_rows = test.has_text, test.has_image

    def acc(logits: torch.Tensor, labels: torch.Tensor) -> float:
        return float((logits.argmax(1) == labels).float().mean())

    skewed = acc(model.predict(test.text[text_rows], None), test.labels[text_rows])
    assert skewed < 0.5
    paired_before = model.predict(test.text, test.image)
    image_before = model.predict(None, test.image[image_rows])
    stats = calibration_stats(model, mixed(90, 3)) + calibration_stats(model, mixed(90, 4))
    assert calibrate_last_layers(model, stats, ("text",), samples_per_class=200, steps=100) == [
        "text"
    ]
    assert model.text_head_calibration is not None and bool(model.text_head_calibration.ready)
    calibrated = acc(model.predict(test.text[text_rows], None), test.labels[text_rows])
    assert calibrated > 0.9 > skewed
    assert torch.equal(model.predict(None, test.image[image_rows]), image_before)
    # paired rows read the text classifier through its calibrated layer in the ensemble
    assert acc(model.predict(test.text, test.image), test.labels) >= acc(paired_before, test.labels)


def test_the_server_fits_the_paths_it_can_and_says_which_it_left() -> None:
    torch.manual_seed(0)
    model = CrossModalNet(CFG)
    state = model.shareable_state_dict()
    # text rows of one class only: the text path cannot be fitted, the image path can
    labels = torch.tensor([0, 0, 1, 2, 0, 1] * 10)
    data = mixed(60, 5, labels=labels)
    every_image = torch.ones_like(data.has_image)
    only_text_class_0 = EmbeddingSet(
        data.text, data.image, data.has_text & (labels == 0), every_image, labels
    )
    fitted, what = calibrated_state(CFG, state, calibration_stats(model, only_text_class_0))
    assert fitted is not None
    assert bool(fitted["image_calibration.ready"]) and not bool(fitted["text_calibration.ready"])
    assert "image-only last layers fitted" in what and "text-only: fewer than two classes" in what


def test_one_sample_moves_a_two_path_release_by_at_most_sqrt10_units() -> None:
    """A paired sample sits on both paths: the release's sensitivity is sqrt(5) per path,
    and the noise is scaled to match."""
    model = CrossModalNet(CFG).eval()
    clip = 0.5
    base = mixed(20, 1)
    extra = mixed(1, 7)  # paired
    bigger = EmbeddingSet(
        *(torch.cat([getattr(base, f), getattr(extra, f)]) for f in ("text", "image")),
        torch.cat([base.has_text, extra.has_text]),
        torch.cat([base.has_image, extra.has_image]),
        torch.cat([base.labels, extra.labels]),
    )
    a = calibration_stats(model, base, clip_norm=clip)
    b = calibration_stats(model, bigger, clip_norm=clip)
    total = 0.0
    for path_parts in (("classifier", "head"), ("text_classifier", "text_head")):
        first = path_parts[0]
        total += float((a.parts[first].count - b.parts[first].count).pow(2).sum())
        for name in path_parts:
            pa, pb = a.parts[name], b.parts[name]
            total += float((pa.total - pb.total).pow(2).sum()) / clip**2
            total += float(torch.triu(pa.outer - pb.outer).pow(2).sum()) / clip**4
    assert math.sqrt(3) * math.sqrt(2) < math.sqrt(total) <= PATH_SENSITIVITY * math.sqrt(2)
    params = CalibrationDPParams(clip_norm=clip, noise_multiplier=1.0)
    noised = privatize_calibration_stats(a, params, torch.Generator().manual_seed(0))
    assert noised.noise.count == pytest.approx(10.0)  # (z sqrt(5 * 2))^2
    assert noised.rows("text") == a.rows("text") and noised.rows("image") == a.rows("image")
