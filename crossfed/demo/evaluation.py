"""Held-out evaluation of global models in the demo: a fresh draw of the built-in dataset
(a seed no client uses), encoded once through the shared embedding cache, scored per Table I
configuration with the same `evaluate` the clients use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.prototypes import ClassPrototypes


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

    @staticmethod
    def load_prototypes(path: Path) -> ClassPrototypes | None:
        """The server's published prototypes file of a round, if it wrote one."""
        from crossfed.common.wire.tensor_codec import decode_tensors

        if not path.is_file():
            return None
        return ClassPrototypes.from_tensors(decode_tensors(path.read_bytes()))

    @classmethod
    def latest_prototypes(
        cls, directory: Path, name_format: str, round_no: int
    ) -> ClassPrototypes | None:
        """The prototypes a client holds after round ``round_no``: the latest published at or
        before it (a calibration round publishes none)."""
        for rnd in range(round_no, 0, -1):
            path = directory / name_format.format(rnd)
            if path.is_file():
                return cls.load_prototypes(path)
        return None

    def evaluate(
        self, state: dict[str, torch.Tensor], prototypes: ClassPrototypes | None = None
    ) -> dict[str, dict[str, float]]:
        """Accuracy and macro-F1 of the global model `state` per configuration, with the
        round's global prototypes (eq. 16) as its only VLMR entries, as a new client has."""
        from crossfed.client.local_trainer import evaluate
        from crossfed.common.model.network import CrossModalNet
        from crossfed.common.model.prototypes import apply_global_prototypes

        model = CrossModalNet(self.model_config)
        model.load_shareable_state_dict(state)
        if prototypes is not None:
            apply_global_prototypes(model, prototypes)
        model.eval()
        with torch.no_grad():
            return evaluate(model, self.data)
