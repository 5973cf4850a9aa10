"""Tiny randomly initialised Hugging Face checkpoints saved to a temp dir (no downloads)."""

from __future__ import annotations

from pathlib import Path

from crossfed.common.model.encoders import default_text_model_dir


def save_tiny_clip(path: Path) -> Path:
    """A 2-layer, 32-wide CLIP with the bundled MiniLM WordPiece tokenizer beside it."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    tokenizer = AutoTokenizer.from_pretrained(str(default_text_model_dir()), local_files_only=True)
    text_cfg = {"vocab_size": tokenizer.vocab_size, "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64,
                "eos_token_id": tokenizer.sep_token_id, "bos_token_id": tokenizer.cls_token_id,
                "pad_token_id": tokenizer.pad_token_id}
    vision_cfg = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    cfg = CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=24)
    model = CLIPModel(cfg)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path
