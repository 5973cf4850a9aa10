"""Randomly initialised Stable Diffusion checkpoints written locally, never downloaded: a tiny
one (16x16 images, ~1 MB, seconds on a CPU) for tests and an SD-1.5-sized one (the UNet, VAE and
CLIP text encoder of SD-1.5's configs, 512x512) for the GPU benchmark. Random weights produce
noise images: they measure cost and exercise the federation, never recovery quality.

The tokenizer is a character-level CLIP BPE vocabulary written here (byte alphabet, no
merges), so no tokenizer file is fetched either. The tiny UNet projects the text states with
diffusers' `encoder_hid_proj` (text_proj), so its trainable set holds both parts of eq. 7's
"cross-attention and text projection"; SD-1.5 has no such layer (attn2 alone trains there).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch

Size = Literal["tiny", "sd15"]
_START, _END = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """GPT-2 / CLIP's printable stand-in character for every byte value."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_clip_tokenizer(directory: Path, model_max_length: int) -> Any:
    """A character-level CLIPTokenizer saved to `directory`; returns it (ids < 514)."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab[_START], vocab[_END] = len(vocab), len(vocab) + 1
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(
            str(vocab_file),
            str(merges_file),
            model_max_length=model_max_length,
            bos_token=_START,
            eos_token=_END,
            pad_token=_END,
            unk_token=_END,
        )
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def _configs(size: Size, text_hidden: int) -> tuple[dict[str, Any], dict[str, Any], int, int]:
    """UNet and VAE configs, the text encoder's layer count and max length."""
    if size == "tiny":
        unet = {
            "sample_size": 8,
            "layers_per_block": 1,
            "block_out_channels": (16, 32),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 24,
            "encoder_hid_dim": text_hidden,  # -> encoder_hid_proj, the text projection
            "encoder_hid_dim_type": "text_proj",
            "attention_head_dim": 8,
            "norm_num_groups": 8,
        }
        vae = {
            "block_out_channels": (16, 32),
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "norm_num_groups": 8,
            "sample_size": 16,
        }
        return unet, vae, 1, 32
    unet = {  # runwayml/stable-diffusion-v1-5 unet/config.json
        "sample_size": 64,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }
    vae = {  # its vae/config.json
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 512,
    }
    return unet, vae, 12, 77


def unet_spec_of_size(size: Size) -> dict[str, tuple[int, ...]]:
    """The trainable spec of a `size` UNet, from its config on the meta device (no memory)."""
    from crossfed.common.model.sd_trainable import trainable_spec_of_unet_config

    unet_cfg, _vae, _layers, _length = _configs(size, 32 if size == "tiny" else 768)
    return trainable_spec_of_unet_config({"in_channels": 4, "out_channels": 4, **unet_cfg})


def save_random_stable_diffusion(
    path: str | Path, size: Size = "tiny", seed: int = 0, device: str = "cpu"
) -> Path:
    """Build a random StableDiffusionPipeline of `size` (weights created on `device`: an
    SD-1.5-sized model initialises in seconds on a GPU) and save it as a diffusers checkpoint
    directory (safetensors, float32)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    text_hidden = 32 if size == "tiny" else 768
    unet_cfg, vae_cfg, text_layers, max_length = _configs(size, text_hidden)
    tokenizer = write_clip_tokenizer(target / "tokenizer", max_length)
    text_cfg = CLIPTextConfig(
        vocab_size=49408 if size == "sd15" else len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=4 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=2 if size == "tiny" else 12,
        max_position_embeddings=max_length,
        hidden_act="quick_gelu",
        projection_dim=text_hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **unet_cfg)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **vae_cfg)
        text = CLIPTextModel(text_cfg)
    scheduler = DDIMScheduler(  # SD-1.5's noise schedule
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe: Any = StableDiffusionPipeline(  # diffusers ships no usable type information
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(target), safe_serialization=True)
    return target
