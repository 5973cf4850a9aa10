"""The global model's share of Stable Diffusion recovery: zero delta buffers under the UNet's
names (module sd_recovery), the feature denoiser kept as fallback, and config validation."""

from __future__ import annotations

import pytest
import torch
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.model_errors import StableDiffusionSetupError
from crossfed.common.model.network import CrossModalNet
from crossfed.common.model.sd_trainable import (
    SD_MODULE,
    TrainableDeltas,
    check_trainable_spec,
    spec_bytes,
    spec_difference,
)
from pydantic import ValidationError

SPEC = {
    "encoder_hid_proj.weight": [24, 32],
    "encoder_hid_proj.bias": [24],
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": [16, 24],
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.bias": [32],
}
SMALL = {"text_dim": 8, "image_dim": 6, "hidden_dim": 16, "num_classes": 3}


def sd_config(**sd: object) -> ModelConfig:
    block = {"checkpoint_digest": "ab" * 32, "trainable": SPEC, **sd}
    return ModelConfig.model_validate(
        {**SMALL, "recovery": "stable-diffusion", "stable_diffusion": block}
    )


def test_sd_network_carries_zero_deltas_and_keeps_the_feature_fallback() -> None:
    torch.manual_seed(0)
    sd_net = CrossModalNet(sd_config())
    torch.manual_seed(0)
    feature_net = CrossModalNet(ModelConfig.model_validate(SMALL))
    state = sd_net.shareable_state_dict()
    sd_keys = {k for k in state if sd_net.module_of(k) == SD_MODULE}
    assert sd_keys == {f"{SD_MODULE}.{name}" for name in SPEC}
    assert all(
        float(state[k].abs().sum()) == 0 and state[k].dtype == torch.float32 for k in sd_keys
    )
    assert tuple(state[f"{SD_MODULE}.encoder_hid_proj.weight"].shape) == (24, 32)
    assert sd_net.diffusion is not None  # clients without the checkpoint recover with it
    assert not any(n.startswith(SD_MODULE) for n, _ in sd_net.named_parameters())  # buffers
    # same seeded init as feature mode for everything else (the deltas draw no numbers)
    other = feature_net.shareable_state_dict()
    assert set(state) - sd_keys == set(other)
    assert all(torch.equal(state[k], other[k]) for k in other)
    # the deltas round-trip through the federation interface
    state[f"{SD_MODULE}.encoder_hid_proj.bias"] = torch.ones(24)
    sd_net.load_shareable_state_dict(state)
    assert sd_net.sd_recovery is not None
    assert torch.equal(sd_net.sd_recovery.deltas()["encoder_hid_proj.bias"], torch.ones(24))


def test_config_requires_the_sd_block_exactly_with_sd_recovery() -> None:
    with pytest.raises(ValidationError, match="crossfed sd-spec"):
        ModelConfig.model_validate({**SMALL, "recovery": "stable-diffusion"})
    with pytest.raises(ValidationError, match="recovery is not stable-diffusion"):
        ModelConfig.model_validate(
            {**SMALL, "stable_diffusion": {"checkpoint_digest": "ab" * 32, "trainable": SPEC}}
        )
    with pytest.raises(ValidationError, match="attn1"):
        sd_config(trainable={"down_blocks.0.attn1.to_q.weight": [4, 4]})
    with pytest.raises(ValidationError, match="checkpoint_digest"):
        sd_config(checkpoint_digest="not-a-digest")
    assert sd_config().stable_diffusion is not None
    settings = sd_config(num_inference_steps=3).stable_diffusion.settings()  # type: ignore[union-attr]
    assert settings.num_inference_steps == 3


def test_spec_checks_and_differences() -> None:
    with pytest.raises(StableDiffusionSetupError, match="shape"):
        check_trainable_spec({"x.attn2.to_q.weight": [0, 4]})
    with pytest.raises(StableDiffusionSetupError, match="empty"):
        check_trainable_spec({})
    with pytest.raises(StableDiffusionSetupError, match="limit"):
        check_trainable_spec({"x.attn2.to_q.weight": [100_000, 100_000]})
    spec = check_trainable_spec(SPEC)
    assert spec_difference(spec, spec) == ""
    smaller = dict(spec)
    smaller.pop("encoder_hid_proj.bias")
    assert "absent" in spec_difference(spec, smaller)
    assert "does not know" in spec_difference(smaller, spec)
    reshaped = {**spec, "encoder_hid_proj.bias": (25,)}
    assert "encoder_hid_proj.bias has shape [25]" in spec_difference(spec, reshaped)
    assert spec_bytes(spec) == 4 * (24 * 32 + 24 + 16 * 24 + 32)
    deltas = TrainableDeltas(spec)
    with pytest.raises(StableDiffusionSetupError, match="do not fit"):
        deltas.load_deltas({"encoder_hid_proj.bias": torch.zeros(24)})


def test_text_path_calibration_is_refused_in_stable_diffusion_mode() -> None:
    """Text-only rows read generated images there, which the calibration round never sees."""
    block = {"checkpoint_digest": "ab" * 32, "trainable": SPEC}
    with pytest.raises(ValidationError, match="calibrate_text_classifier does not work"):
        ModelConfig.model_validate(
            {
                **SMALL,
                "recovery": "stable-diffusion",
                "stable_diffusion": block,
                "calibrate_text_classifier": True,
            }
        )
    image_path = sd_config().model_copy(update={"calibrate_image_classifier": True})
    assert image_path.calibration_paths() == ("image",)
