"""Model bundles: one safetensors file with weights, config, classes, prototypes, encoders and
epsilon; loading checks every part and names, in one line, what does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from crossfed.common.model.encoder_identity import EncoderIdentity
from crossfed.common.model.model_bundle import ModelBundle, decode_bundle, load_bundle
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.model_errors import ModelError
from crossfed.common.model.network import CrossModalNet
from crossfed.common.model.prototypes import ClassPrototypes
from crossfed.common.wire.tensor_codec import decode_metadata, decode_tensors, encode_tensors

CONFIG = ModelConfig(text_dim=8, image_dim=6, hidden_dim=8, num_classes=3)
NAMES = ("bird", "cat", "dog")


def _bundle(**changes: object) -> ModelBundle:
    torch.manual_seed(0)
    model = CrossModalNet(CONFIG)
    prototypes = ClassPrototypes(
        torch.randn(3, 8), torch.randn(3, 6), torch.tensor([2.0, 1.0, 0.0]), torch.ones(3)
    )
    fields: dict[str, object] = {
        "state": model.shareable_state_dict(),
        "model_config": CONFIG,
        "class_names": NAMES,
        "text_encoder": EncoderIdentity("minilm", "hf-text:m:1"),
        "image_encoder": EncoderIdentity("cnn", "cnn:v2:2", 32),
        "prototypes": prototypes,
        "round": 4,
        "run_id": "abc",
        "epsilon": 3.5,
        "delta": 1e-5,
    }
    fields.update(changes)
    return ModelBundle(**fields)  # type: ignore[arg-type]


def _rewrite(
    bundle: ModelBundle, meta: dict[str, str] | None = None, **tensors: torch.Tensor
) -> bytes:
    """The bundle's bytes with metadata entries and tensors replaced (a tampered file)."""
    data = bundle.encode()
    return encode_tensors(
        {**decode_tensors(data), **tensors}, {**decode_metadata(data), **(meta or {})}
    )


def test_round_trip_keeps_every_part_and_predicts_like_the_original(tmp_path: Path) -> None:
    original = _bundle()
    path = tmp_path / "m.safetensors"
    path.write_bytes(original.encode())
    loaded = load_bundle(path)
    assert loaded.class_names == NAMES and loaded.round == 4 and loaded.run_id == "abc"
    assert loaded.epsilon == 3.5 and loaded.delta == 1e-5
    assert loaded.image_encoder == original.image_encoder
    assert loaded.model_config == CONFIG
    assert loaded.prototypes is not None
    assert torch.equal(loaded.prototypes.text_sum, original.prototypes.text_sum)  # type: ignore[union-attr]
    text, image = torch.randn(5, 8), torch.randn(5, 6)
    for args in ((text, image), (text, None), (None, image)):
        assert torch.allclose(
            loaded.build_model().predict(*args), original.build_model().predict(*args)
        )
    # the prototypes are what text-only rows retrieve (VLMR): they change the prediction
    without = _bundle(prototypes=None).build_model().predict(text, None)
    assert not torch.allclose(without, loaded.build_model().predict(text, None))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda b: encode_tensors(b.state), "not a crossfed model bundle (a bare checkpoint?"),
        (lambda b: b"not safetensors at all", "not a safetensors file"),
        (lambda b: _rewrite(b, {"version": "9"}), "bundle version '9'"),
        (lambda b: _rewrite(b, {"class_names": json.dumps(["a", "b"])}), "2 class names for a 3"),
        (lambda b: _rewrite(b, {"class_names": json.dumps(["a", "a", "b"])}), "repeated: a"),
        (lambda b: _rewrite(b, {"model_config": "{}x"}), "model_config"),
        (lambda b: _rewrite(b, {"epsilon": "nan"}), "'epsilon' must be finite"),
        (lambda b: _rewrite(b, {"encoders": '{"text": 3}'}), "text encoder entry"),
        (
            lambda b: _rewrite(b, **{"model/head.bias": torch.full((3,), float("inf"))}),
            "non-finite values in ['head.bias']",
        ),
        (lambda b: _rewrite(b, **{"model/head.bias": torch.zeros(4)}), "shape mismatch"),
        (lambda b: _rewrite(b, extra=torch.zeros(1)), "unexpected tensors ['extra']"),
        (
            lambda b: _rewrite(b, **{"prototypes/text_sum": torch.zeros(2, 8)}),
            "prototype shapes disagree",
        ),
    ],
)
def test_every_inconsistency_is_one_line(tamper, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelError) as info:
        decode_bundle(tamper(_bundle()), "m.safetensors")
    text = str(info.value)
    assert text.startswith("m.safetensors: ") and message in text and "\n" not in text


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such file"):
        load_bundle(tmp_path / "nope.safetensors")
    with pytest.raises(ModelError, match="not a regular file"):
        load_bundle(tmp_path)
