"""Stable Diffusion recovery on CUDA (`-m gpu`; skipped without a GPU): the tiny random
checkpoint generates under autocast, fine-tunes attn2 + text projection with float32 deltas,
and the client step serves its second round from the cache; the benchmark's tiny form runs on
the GPU and reports its peak memory."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from crossfed.common.data.embedding_cache import EmbeddingCache
from crossfed.common.model.encoders import SmallCNNImageEncoder
from crossfed.common.model.sd_random_checkpoint import save_random_stable_diffusion
from crossfed.common.model.sd_recovery import SDRecoverySettings, StableDiffusionRecovery

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
REPO = Path(__file__).resolve().parents[3]


def test_generation_and_finetuning_on_cuda(tmp_path: Path) -> None:
    checkpoint = save_random_stable_diffusion(tmp_path / "sd", device="cuda")
    settings = SDRecoverySettings(num_inference_steps=2, finetune_steps=2, finetune_batch_size=4)
    rec = StableDiffusionRecovery(
        checkpoint,
        SmallCNNImageEncoder.pretrained(),
        EmbeddingCache(tmp_path / "cache"),
        settings,
        device="cuda",
    )
    assert rec.precision in ("bfloat16", "float16")
    assert all(p.device.type == "cuda" for p in rec.trainable_parameters())
    feats = rec.recover_features(["a red circle", "a blue square"])
    assert feats.shape == (2, 256) and torch.isfinite(feats).all()
    images = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    losses = rec.finetune(images, ["a", "b", "c", "d"])
    assert len(losses) == 2 and all(np.isfinite(losses))
    deltas = rec.deltas()
    assert all(d.device.type == "cpu" and d.dtype == torch.float32 for d in deltas.values())
    assert any(float(d.abs().sum()) > 0 for d in deltas.values())
    # the cache is keyed by the set of distinct captions: the same set (any order, repeats)
    # is served from the last generation without running the pipeline again
    again = rec.recover_features(["a blue square", "a red circle", "a red circle"], reuse_last=True)
    assert torch.equal(again, feats[[1, 0, 0]])
    assert rec.cache is not None and rec.cache.stats.hits == 1


def test_tiny_benchmark_on_cuda(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import sd_recovery_gpu

    args = sd_recovery_gpu.parse_args(
        ["--tiny", "--device", "cuda", "--images", "4", "--steps", "2", "--batch", "4"]
        + ["--finetune-steps", "2", "--work-dir", str(tmp_path)]
    )
    result = sd_recovery_gpu.run(args)
    assert result["peak_gpu_bytes_generation"] > 0 and result["peak_gpu_bytes_finetune"] > 0
    assert result["cached_round_hit"] is True and result["finetune_loss_finite"]
