"""benchmarks/sd_recovery_gpu.py in its --tiny CPU form: it builds the random checkpoint, runs
the text-only client's round (generation, then the cached round) and the batch fine-tuning,
and reports the numbers the GPU run is for, including SD-1.5's attn2 upload size."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import sd_recovery_gpu


def sd15_attn2_bytes() -> int:
    """SD-1.5's cross-attention: 16 transformer blocks of width C (5 x 320, 5 x 640, 6 x 1280)
    with to_q, to_out (C x C, to_out with a bias) and to_k, to_v (C x 768), float32."""
    blocks = ((320, 5), (640, 5), (1280, 6))
    return 4 * sum(n * (2 * c * c + 2 * 768 * c + c) for c, n in blocks)


def test_tiny_benchmark_reports_the_round(tmp_path: Path) -> None:
    args = sd_recovery_gpu.parse_args(
        ["--tiny", "--device", "cpu", "--images", "3", "--steps", "2", "--guidance", "1"]
        + ["--batch", "2", "--finetune-steps", "1", "--finetune-batch", "2", "--threads", "1"]
        + ["--work-dir", str(tmp_path)]
    )
    result = sd_recovery_gpu.run(args)
    assert result["generated_images"] == 3 and result["seconds_per_image"] > 0
    assert result["cached_round_hit"] is True
    assert result["seconds_per_finetune_step"] > 0 and result["finetune_loss_finite"]
    assert result["trainable_tensors"] == 22  # 3 attn2 blocks x 5 + mid x 5 + text projection x 2
    assert result["sd_deltas_upload_bytes"] > 4 * result["trainable_parameters"]
    assert result["sd15_deltas_bytes_computed"] == sd15_attn2_bytes() == 175_850_240
    assert result["text_only_upload_bytes"] < result["global_model_download_bytes"]
