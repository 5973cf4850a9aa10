"""Cost of Stable Diffusion recovery (eq. 6-7) for one client round, on random weights.

Builds an SD-1.5-sized checkpoint with random weights locally (UNet, VAE and CLIP text
encoder from SD-1.5's configs, a character-level CLIP tokenizer; nothing is downloaded), then
runs a text-only client's round through the client's SD code (client/sd_recovery_step.py):
generate f^_i = E_i(D_stable(x_t)) for its captions (cache miss, then the cached second round),
train the network on them when pydantic is there, and times the fine-tuning a paired client
runs (attn2 + text projection, batch 8). Prints and writes (--out) seconds per generated
image, seconds per fine-tune step, peak GPU memory and upload bytes.

    python benchmarks/sd_recovery_gpu.py --out sd_gpu.json             # SD-1.5 size, CUDA
    python benchmarks/sd_recovery_gpu.py --tiny --device cpu           # a CPU check

Needs torch, diffusers, transformers, safetensors and numpy; crossfed is imported from this
checkout (no install). Random weights: cost only, never quality.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: setup.py's folder -> subpackage mapping, for the parts this benchmark imports.
_NAMESPACE = (
    ("crossfed", "crossfed"),
    ("crossfed.common", "common"),
    ("crossfed.client", "client"),
    ("crossfed.v1", "protos/crossfed/v1"),
)


def import_crossfed_from_checkout() -> None:
    """Make `crossfed.common` / `crossfed.client` this checkout's folders (no install needed;
    nothing to do where crossfed is installed from this checkout, e.g. editable)."""
    found = importlib.util.find_spec("crossfed")
    if found is not None and found.origin and Path(found.origin).resolve().is_relative_to(REPO):
        return
    for name, folder in _NAMESPACE:
        spec = importlib.util.spec_from_file_location(
            name, REPO / folder / "__init__.py", submodule_search_locations=[str(REPO / folder)]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def _captions(n: int) -> list[str]:
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    shapes = ["circle", "square", "cross", "triangle", "star", "ring", "heart", "arrow"]
    return [f"a photo of a {colours[i % 8]} {shapes[(i // 8) % 8]}, number {i}" for i in range(n)]


class GpuMemory:
    """Peak allocated CUDA memory of a phase (0 on the CPU)."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda")
        self.torch = torch

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        if not self.cuda:
            return 0
        self.torch.cuda.synchronize()
        return int(self.torch.cuda.max_memory_allocated())

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import_crossfed_from_checkout()
    import numpy as np
    import torch
    from crossfed.client.sd_recovery_step import SDClientOptions, SDRecoveryStep
    from crossfed.common.data.embedding_cache import EmbeddingCache
    from crossfed.common.data.embeddings import EmbeddingSet
    from crossfed.common.data.raw_dataset import RawDataset
    from crossfed.common.model.encoders import SmallCNNImageEncoder
    from crossfed.common.model.sd_random_checkpoint import (
        save_random_stable_diffusion,
        unet_spec_of_size,
    )
    from crossfed.common.model.sd_recovery import SDRecoverySettings
    from crossfed.common.model.sd_trainable import SD_MODULE, spec_bytes
    from crossfed.common.wire.tensor_codec import encode_tensors

    size = "tiny" if args.tiny else "sd15"
    device = args.device or ("cpu" if args.tiny else "cuda")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    mem = GpuMemory(device)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="crossfed-sd-bench-"))
    result: dict[str, Any] = {
        "size": size,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else "none",
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    t_all = time.perf_counter()

    t = time.perf_counter()
    checkpoint = save_random_stable_diffusion(work / f"sd-{size}", size, seed=0, device=device)
    mem.sync()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the built modules are gone; the client loads from disk
    result["build_seconds"] = time.perf_counter() - t
    result["checkpoint_bytes"] = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())

    settings = SDRecoverySettings(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        image_size=args.image_size,
        generation_batch_size=args.batch,
        finetune_batch_size=args.finetune_batch,
        finetune_steps=args.finetune_steps,
        regenerate_every=2,
    )
    captions = _captions(args.images)
    n = len(captions)
    train_raw = RawDataset(
        images=np.zeros((n, 1, 1, 3), dtype=np.uint8),
        texts=captions,
        labels=np.arange(n, dtype=np.int64) % 4,
        has_text=np.ones(n, dtype=bool),
        has_image=np.zeros(n, dtype=bool),
    )
    encoder = SmallCNNImageEncoder.pretrained()
    train = EmbeddingSet(
        text=torch.randn(n, 384),
        image=torch.zeros(n, encoder.dim),
        has_text=torch.ones(n, dtype=torch.bool),
        has_image=torch.zeros(n, dtype=torch.bool),
        labels=torch.from_numpy(train_raw.labels),
    )
    empty = train.subset([])
    cache = EmbeddingCache(work / "cache")

    t = time.perf_counter()
    step = SDRecoveryStep(
        SDClientOptions(checkpoint, device), device, encoder, train_raw, None, cache
    )
    result["digest_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    rec_spec = unet_spec_of_size(size)
    step.bind(settings, rec_spec)
    rec = step.recovery
    assert rec is not None
    mem.sync()
    result["load_seconds"] = time.perf_counter() - t
    result["image_size"] = rec.image_size
    result["num_inference_steps"] = settings.num_inference_steps
    result["guidance_scale"] = settings.guidance_scale
    result["generation_batch_size"] = settings.generation_batch_size
    result["precision"] = rec.precision

    # warm-up (kernels, autotuning) on other captions, uncached
    rec.generate(["warm-up caption"] * min(settings.generation_batch_size, 2))
    mem.sync()
    zero = {k: torch.zeros(s) for k, s in rec_spec.items()}
    mem.reset()
    t = time.perf_counter()
    train_gen, _ = step.with_generated_features(1, zero, train, empty)
    mem.sync()
    gen_seconds = time.perf_counter() - t
    result["generated_images"] = int(step.metrics["sd_generated_images"])
    result["seconds_per_image"] = gen_seconds / n
    result["peak_gpu_bytes_generation"] = mem.peak()
    t = time.perf_counter()
    step.with_generated_features(2, zero, train, empty)  # regenerate_every 2: the cache
    result["cached_round_seconds"] = time.perf_counter() - t
    result["cached_round_hit"] = bool(step.metrics["sd_cache_hit"])
    result.update(_network_round(train_gen, rec_spec, rec.base_digest))

    # the fine-tuning a paired client runs (eq. 7), batch 8 by default
    rng = np.random.default_rng(0)
    side = rec.image_size
    images = rng.integers(0, 256, (2 * args.finetune_batch, side, side, 3), dtype=np.uint8)
    pair_captions = _captions(len(images))
    rec.finetune(images, pair_captions, steps=1, seed=0)  # warm-up
    mem.reset()
    t = time.perf_counter()
    losses = rec.finetune(images, pair_captions, steps=args.finetune_steps, seed=1)
    mem.sync()
    result["finetune_batch_size"] = args.finetune_batch
    result["finetune_steps_timed"] = len(losses)
    result["seconds_per_finetune_step"] = (time.perf_counter() - t) / max(len(losses), 1)
    result["peak_gpu_bytes_finetune"] = mem.peak()
    result["finetune_loss_finite"] = bool(np.isfinite(losses).all())

    deltas = rec.deltas()
    payload = encode_tensors({f"{SD_MODULE}.{k}": v for k, v in deltas.items()})
    result["trainable_tensors"] = len(deltas)
    result["trainable_parameters"] = int(sum(v.numel() for v in deltas.values()))
    result["sd_deltas_upload_bytes"] = len(payload)
    result["sd_deltas_chunks_1mib"] = -(-len(payload) // (1 << 20))
    result["sd15_deltas_bytes_computed"] = spec_bytes(unet_spec_of_size("sd15"))
    result.update(_feature_recovery_cost())
    result["total_seconds"] = time.perf_counter() - t_all
    return result


def _feature_recovery_cost(rows: int = 2048) -> dict[str, Any]:
    """The alternative, feature-space recovery (default ModelConfig sizes) on this machine's
    CPU, where edge clients run it: f^_i for `rows` text-only rows, per sample, with one
    DDIM step (the default) and with 50."""
    import torch
    from crossfed.common.model.feature_diffusion import FeatureDiffusion

    model = FeatureDiffusion(256, 384, 256, train_steps=100, sample_steps=1).eval()
    f_t = torch.randn(rows, 384)
    out: dict[str, Any] = {}
    for steps in (1, 50):
        model.sample(f_t[:8], steps=steps)  # warm-up
        t = time.perf_counter()
        model.sample(f_t, steps=steps)
        key = f"feature_recovery_cpu_seconds_per_sample_{steps}step"
        out[key] = (time.perf_counter() - t) / rows
    return out


def _network_round(train: Any, spec: dict[str, tuple[int, ...]], digest: str) -> dict[str, Any]:
    """The text-only client's network training on the generated features and its upload
    (no SD deltas: it fine-tunes nothing); skipped where pydantic is not installed."""
    try:
        from crossfed.client.local_trainer import TrainConfig, train_local
        from crossfed.common.model.model_config import ModelConfig
        from crossfed.common.model.network import CrossModalNet
        from crossfed.common.model.sd_trainable import SD_MODULE
        from crossfed.common.wire.tensor_codec import encode_tensors
    except ImportError as exc:
        return {"network_round": f"skipped ({exc.name} not installed)"}
    config = ModelConfig.model_validate(
        {
            "recovery": "stable-diffusion",
            "stable_diffusion": {
                "checkpoint_digest": digest,
                "trainable": {k: list(v) for k, v in spec.items()},
            },
        }
    )
    model = CrossModalNet(config)
    t = time.perf_counter()
    result = train_local(model, train, TrainConfig(epochs=1, batch_size=64, lr=2e-3, num_threads=1))
    seconds = time.perf_counter() - t
    state = model.shareable_state_dict()
    without_sd = {k: v for k, v in state.items() if not k.startswith(SD_MODULE + ".")}
    return {
        "network_round_seconds": seconds,
        "network_loss_cls": result.metrics.get("cls", float("nan")),
        "text_only_upload_bytes": len(encode_tensors(without_sd)),
        "global_model_download_bytes": len(encode_tensors(state)),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (also what the tests call `run` with)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model (CPU check)")
    parser.add_argument("--device", default=None, help="cuda (default) / cpu (default --tiny)")
    parser.add_argument("--images", type=int, default=None, help="distinct captions generated")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps per image")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance")
    parser.add_argument("--batch", type=int, default=8, help="generation batch size")
    parser.add_argument("--finetune-steps", type=int, default=5, help="timed fine-tune steps")
    parser.add_argument("--finetune-batch", type=int, default=8, help="fine-tune batch size")
    parser.add_argument("--image-size", type=int, default=None, help="pixels (default native)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--work-dir", default=None, help="where the checkpoint is written")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.images is None:
        args.images = 8 if args.tiny else 32
    return args


def main() -> int:
    args = parse_args()
    needed = ("torch", "diffusers", "transformers", "safetensors", "numpy")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        print(f"sd_recovery_gpu: needs {', '.join(missing)} installed", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    result = run(args)
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
