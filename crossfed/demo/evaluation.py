"""Held-out evaluation of global models in the demo: a fresh draw of the built-in dataset
(a seed no client uses), encoded once through the shared embedding cache, scored per Table I
configuration with the same `evaluate` the clients use, on the model bundle the server
exports for the round."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.model_bundle import ModelBundle
from crossfed.common.model.model_config import ModelConfig


@dataclass
class HeldOutEvaluator:
    """Scores a shareable state dict on held-out paired data (text/image hidden as needed)."""

    data: EmbeddingSet
    model_config: ModelConfig

    @classmethod
    def build(
        cls, num_samples: int, seed: int, cache_dir: Path, model_config: ModelConfig | None = None
    ) -> HeldOutEvaluator:
        """Generate and encode the held-out set (cached after the first run)."""
        from transformers.utils import logging as hf_logging

        from crossfed.common.data.embedding_cache import EmbeddingCache, encode_dataset
        from crossfed.common.data.synthetic_shapes import (
            SyntheticShapesConfig,
            generate_synthetic_shapes,
        )
        from crossfed.common.model.encoders import build_image_encoder, build_text_encoder

        hf_logging.disable_progress_bar()  # the demo shows its own progress
        config = model_config or ModelConfig()
        raw = generate_synthetic_shapes(SyntheticShapesConfig(num_samples=num_samples, seed=seed))
        data = encode_dataset(
            raw,
            build_text_encoder("minilm"),
            build_image_encoder("cnn", out_dim=config.image_dim),
            EmbeddingCache(cache_dir),
        )
        return cls(data=data, model_config=config)

    def evaluate(self, bundle: ModelBundle) -> dict[str, dict[str, float]]:
        """Accuracy and macro-F1 per configuration of a model bundle: its global weights with
        its global prototypes (eq. 16) as the only VLMR entries, as a new client has them."""
        from crossfed.common.model.evaluation import evaluate

        with torch.no_grad():
            return evaluate(bundle.build_model(), self.data)
