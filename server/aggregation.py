"""Streaming, module-aware weighted FedAvg (eq. 15).

One running weighted sum per parameter, updated as each validated upload arrives, so server
memory is O(model), not O(clients x model). Each module's parameters are averaged over the
clients that actually trained it, weighted by the samples that trained it (an image-only
client's untouched mapper copy gets weight 0 and cannot dilute the paired clients' mapper).
A module nobody trained keeps its previous global value; integer/bool buffers are never
averaged (the global value is kept).

Central DP wraps any strategy around this fold (server/strategies/central_dp.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from crossfed.server.errors import InvalidUpdateError

ModuleOf = Callable[[str], str]


def is_averaged(tensor: torch.Tensor) -> bool:
    """Floating-point tensors are averaged; integer/bool buffers (counters) are not."""
    return tensor.is_floating_point() or tensor.is_complex()


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate half precisions in float32 (no overflow/rounding drift), keep wider types."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def module_weights_of(
    num_samples: int, module_samples: Mapping[str, int], modules: frozenset[str]
) -> dict[str, float]:
    """Per-module weights of one upload: ``module_samples`` when given (modules it omits were
    not trained: weight 0), else ``num_samples`` for every module (plain eq. 15)."""
    if num_samples <= 0:
        raise InvalidUpdateError(f"num_samples must be > 0 (|D_i| of eq. 15), got {num_samples}")
    if not module_samples:
        return {m: float(num_samples) for m in modules}
    unknown = sorted(set(module_samples) - modules)
    if unknown:
        raise InvalidUpdateError(
            f"module_samples names unknown module(s) {unknown}; the model's modules are "
            f"{sorted(modules)}"
        )
    over = {m: n for m, n in module_samples.items() if n > num_samples}
    if over:
        raise InvalidUpdateError(
            f"module_samples {over} exceed num_samples={num_samples}: a module cannot be "
            "trained on more samples than the client holds"
        )
    return {m: float(module_samples.get(m, 0)) for m in modules}


class StreamingFedAvg:
    """Running weighted sum of one round attempt: ``add`` each validated update, then
    ``result`` gives theta_global[k] = sum_i w_im theta_i[k] / sum_i w_im (m = module of k)."""

    def __init__(
        self,
        global_state: Mapping[str, torch.Tensor],
        module_of: ModuleOf,
    ) -> None:
        self._global = dict(global_state)
        self._module_of_key = {k: module_of(k) for k in self._global}
        self.modules: frozenset[str] = frozenset(
            m for k, m in self._module_of_key.items() if is_averaged(self._global[k])
        )
        self._acc: dict[str, torch.Tensor] = {}
        self._weight: dict[str, float] = {m: 0.0 for m in self.modules}
        self.num_updates = 0
        self.total_samples = 0
        self._result: dict[str, torch.Tensor] | None = None

    @property
    def module_weight_totals(self) -> dict[str, float]:
        """Sum of weights per module so far (0 = nobody trained it yet)."""
        return dict(self._weight)

    def contributed_keys(self, weights: Mapping[str, float]) -> list[str]:
        """The averaged tensors an upload with these module weights is folded into."""
        return [
            key
            for key, glob in self._global.items()
            if is_averaged(glob) and float(weights.get(self._module_of_key[key], 0.0)) > 0.0
        ]

    def add(
        self,
        update: Mapping[str, torch.Tensor],
        weights: Mapping[str, float],
        num_samples: int,
        scale: float = 1.0,
    ) -> None:
        """Fold one already-validated update into the running sum (one fused pass per tensor).
        ``scale`` < 1 folds theta_g + scale (theta_i - theta_g) instead (an update clipped by
        the server's update bound, or by central DP)."""
        if self._result is not None:
            raise RuntimeError("this round's running sum was already turned into its result")
        if not (math.isfinite(scale) and 0.0 <= scale <= 1.0):
            raise ValueError(f"scale must be in [0, 1], got {scale}")
        for key in self.contributed_keys(weights):
            glob = self._global[key]
            w = float(weights[self._module_of_key[key]])
            value = update[key]
            if scale < 1.0:  # theta_g + s * (theta_i - theta_g), in float64: no overflow
                wide = torch.lerp(glob.to(torch.float64), value.to(torch.float64), scale)
                value = wide.to(glob.dtype)
            acc = self._acc.get(key)
            if acc is None:  # first contribution: one pass, no zero-fill
                self._acc[key] = torch.mul(value.to(accumulator_dtype(glob.dtype)), w)
            else:
                acc.add_(value if value.dtype == acc.dtype else value.to(acc.dtype), alpha=w)
        for module in self.modules:
            w = float(weights.get(module, 0.0))
            self._weight[module] += w
        self.num_updates += 1
        self.total_samples += int(num_samples)

    def result(self) -> dict[str, torch.Tensor]:
        """The new global state: averaged where some client trained the module, else kept.

        Divides the running sum in place (no second model-sized buffer at commit time), so the
        aggregator is finished afterwards: ``add`` refuses, ``result`` returns the same state.
        """
        if self._result is not None:
            return dict(self._result)
        out: dict[str, torch.Tensor] = {}
        for key, glob in self._global.items():
            acc = self._acc.get(key)
            module = self._module_of_key[key]
            total = self._weight.get(module, 0.0)
            if acc is None or total <= 0.0 or not is_averaged(glob):
                out[key] = glob
                continue
            out[key] = acc.div_(total).to(glob.dtype)
        self._acc = {}
        self._result = out
        return dict(out)
