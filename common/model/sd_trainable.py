"""The federated share of Stable Diffusion recovery (eq. 6-7): which UNet tensors fine-tune
(cross-attention `attn2` and the text projection), their names/shapes (the *trainable spec*),
the content digest of the base checkpoint, and the delta buffers the global model carries.

The server never loads the checkpoint. The global model holds, per trainable tensor, the delta
theta - theta_base (zeros at round 0) under the UNet's own parameter name; a client adds the
averaged delta to its local base weights. Every SD client holds the same base (same digest,
checked at registration), so FedAvg of the deltas is FedAvg of the weights (eq. 15 is linear).
Names and shapes come from the server's config (`crossfed sd-spec DIR` derives them from a
checkpoint); a client derives them from its own UNet and refuses a mismatch at registration.
Imports torch only, so the GPU benchmark runs without the server's dependencies.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from crossfed.common.model.model_errors import StableDiffusionSetupError
from torch import nn

#: Module name of the deltas in CrossModalNet's state dict and in module-aware FedAvg.
SD_MODULE = "sd_recovery"
#: UNet parameter-name parts that fine-tune (eq. 7, "only the cross-attention and text
#: projection layers"): attn2 is every transformer block's cross-attention (to_q, to_k, to_v,
#: to_out), encoder_hid_proj the UNet's projection of the text-encoder states into the
#: cross-attention width (diffusers' encoder_hid_dim_type="text_proj"). SD-1.x/2.x UNets have
#: no encoder_hid_proj (the text states enter attn2.to_k / to_v directly), so there the
#: trainable set is attn2 alone. The text encoder and the VAE stay frozen.
TRAINABLE_MARKERS = ("attn2", "encoder_hid_proj")
#: Largest trainable set a config may declare (elements; SD-1.5's attn2 holds ~5e7).
MAX_TRAINABLE_ELEMENTS = 1_000_000_000
_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")

TrainableSpec = dict[str, tuple[int, ...]]


def is_trainable_name(name: str) -> bool:
    """Whether a UNet parameter name belongs to the fine-tuned set (attn2 or text projection)."""
    return any(marker in name.split(".") for marker in TRAINABLE_MARKERS)


def trainable_spec_of(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> TrainableSpec:
    """Names and shapes of the trainable tensors among a UNet's named parameters."""
    return {name: tuple(p.shape) for name, p in named_parameters if is_trainable_name(name)}


def check_trainable_spec(spec: Mapping[str, Sequence[int]]) -> TrainableSpec:
    """The spec as a TrainableSpec; raises StableDiffusionSetupError on a malformed one."""
    out: TrainableSpec = {}
    total = 0
    for name, shape in spec.items():
        if not _NAME.match(name) or not is_trainable_name(name):
            raise StableDiffusionSetupError(
                f"trainable tensor {name!r} is not an attn2 / text-projection parameter name"
            )
        dims = tuple(int(d) for d in shape)
        if not dims or any(d <= 0 for d in dims):
            raise StableDiffusionSetupError(f"trainable tensor {name!r} has shape {list(dims)}")
        numel = 1
        for d in dims:
            numel *= d
        total += numel
        out[name] = dims
    if not out:
        raise StableDiffusionSetupError("the trainable spec is empty")
    if total > MAX_TRAINABLE_ELEMENTS:
        raise StableDiffusionSetupError(
            f"the trainable spec holds {total} elements, over the {MAX_TRAINABLE_ELEMENTS} limit"
        )
    return out


def spec_difference(
    expected: Mapping[str, Sequence[int]], actual: Mapping[str, Sequence[int]]
) -> str:
    """'' when both specs agree, else one line naming the first difference."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing:
        return f"{len(missing)} tensor(s) the run fine-tunes are absent, e.g. {missing[0]}"
    if extra:
        return (
            f"{len(extra)} attn2/text-projection tensor(s) the run does not know, e.g. {extra[0]}"
        )
    for name in expected:
        if tuple(expected[name]) != tuple(actual[name]):
            return f"{name} has shape {list(actual[name])}, the run expects {list(expected[name])}"
    return ""


def spec_bytes(spec: Mapping[str, Sequence[int]], element_size: int = 4) -> int:
    """Raw tensor bytes of the spec's deltas (float32 by default)."""
    total = 0
    for shape in spec.values():
        numel = 1
        for d in shape:
            numel *= int(d)
        total += numel
    return total * element_size


def trainable_spec_of_unet_config(config: Mapping[str, Any]) -> TrainableSpec:
    """The trainable spec of the UNet a diffusers config describes (built on the meta device:
    no weights, no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(config))
    spec = trainable_spec_of(unet.named_parameters())
    if not spec:
        raise StableDiffusionSetupError("the UNet has no attn2 / text-projection parameters")
    return spec


def trainable_spec_of_checkpoint(checkpoint_dir: str | Path) -> TrainableSpec:
    """The trainable spec of a checkpoint's UNet, from its config alone."""
    from diffusers import UNet2DConditionModel

    unet_dir = Path(checkpoint_dir) / "unet"
    try:
        config = UNet2DConditionModel.load_config(str(unet_dir), local_files_only=True)
        return trainable_spec_of_unet_config(config)
    except (OSError, ValueError, TypeError) as exc:
        raise StableDiffusionSetupError(
            f"cannot read the UNet config in {unet_dir}: {exc}"
        ) from exc


@lru_cache(maxsize=8)
def _digest_of(root: str, entries: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256(b"crossfed.sd-checkpoint/1")
    for rel, size, _mtime in entries:
        h.update(rel.encode())
        h.update(size.to_bytes(8, "little"))
        with open(Path(root) / rel, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def checkpoint_digest(checkpoint_dir: str | Path) -> str:
    """SHA-256 over a diffusers checkpoint directory: every non-hidden file's path relative to
    the directory, size and bytes (location-independent, unlike an encoder's weights digest;
    memoised per process by size + mtime)."""
    root = Path(checkpoint_dir)
    if not (root / "model_index.json").is_file():
        raise StableDiffusionSetupError(
            f"{root} is not a local diffusers checkpoint (no model_index.json)"
        )
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    entries = tuple(
        (p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files
    )
    return _digest_of(str(root), entries)


class TrainableDeltas(nn.Module):
    """theta - theta_base of every trainable UNet tensor, as float32 buffers under the UNet's
    own names (state-dict key ``sd_recovery.<name>``). Buffers, not parameters: the local
    optimiser of eq. 14 never touches them; the SD fine-tuning writes them (`load_deltas`)."""

    def __init__(self, spec: Mapping[str, Sequence[int]]) -> None:
        super().__init__()
        self.spec = check_trainable_spec(spec)
        for name, shape in self.spec.items():
            owner: nn.Module = self
            *path, leaf = name.split(".")
            try:
                for part in path:
                    child = owner._modules.get(part)
                    if child is None:
                        child = nn.Module()
                        owner.add_module(part, child)
                    owner = child
                owner.register_buffer(leaf, torch.zeros(shape))
            except (KeyError, TypeError) as exc:
                raise StableDiffusionSetupError(
                    f"trainable tensor {name!r} cannot be held: {exc}"
                ) from exc

    def deltas(self) -> dict[str, torch.Tensor]:
        """The current deltas by UNet name (views of the buffers)."""
        return dict(self.named_buffers())

    @torch.no_grad()
    def load_deltas(self, deltas: Mapping[str, torch.Tensor]) -> None:
        """Copy deltas in; the key set and shapes must match the spec exactly."""
        own = self.deltas()
        diff = spec_difference(self.spec, {k: tuple(v.shape) for k, v in deltas.items()})
        if diff:
            raise StableDiffusionSetupError(f"deltas do not fit the trainable spec: {diff}")
        for name, value in deltas.items():
            own[name].copy_(value)
