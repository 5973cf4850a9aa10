"""Server-side optimizers on the round's pseudo-gradient: FedAvgM, FedAdagrad, FedAdam, FedYogi.

Each wraps an inner strategy (FedAvg's aggregation, eq. 15) and replaces its ``finish_round``
by one optimizer step on Delta = aggregate - global (Reddi et al., ICLR 2021, "Adaptive
Federated Optimization", Algorithm 2; FedAvgM: Hsu et al. 2019). Module-aware: only keys of
``aggregate.trained_modules`` step; a module nobody trained keeps its global value and its
optimizer state is neither updated nor decayed that round. Integer buffers are never touched.
The update is the paper's, without Adam-style bias correction, with v_{-1} = tau^2. State
(first/second moments per key in float32; per module, how many rounds it stepped, int64) round-
trips through ``state_dict`` / ``load_state_dict`` bit-identically, so a restarted server resumes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from crossfed.server.strategies.base import (
    ModuleOf,
    RoundAggregator,
    RoundInstructions,
    RoundResult,
    Strategy,
)

#: state_dict key prefixes: first moment, second moment, per-module step count, inner strategy.
MOMENT_PREFIX = "m/"
SECOND_MOMENT_PREFIX = "v/"
STEPS_PREFIX = "steps/"
INNER_PREFIX = "inner/"


def _is_averaged(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def _check_rate(name: str, value: float, low: float, high: float, *, high_open: bool) -> None:
    ok = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


class ServerOptimizer:
    """Shared machinery: wrap ``inner``, step keys of trained modules, keep/validate state.

    Subclasses define ``_SLOTS`` (which moments they keep) and ``_step`` (the update rule on
    one float32 tensor)."""

    name = "server-optimizer"
    _SLOTS: tuple[str, ...] = (MOMENT_PREFIX,)

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self._module_of: ModuleOf | None = None
        self._moments: dict[str, dict[str, torch.Tensor]] = {slot: {} for slot in self._SLOTS}
        self._steps: dict[str, int] = {}

    # -- Strategy ---------------------------------------------------------------------------
    def configure_round(self, round_no: int) -> RoundInstructions:
        return self.inner.configure_round(round_no)

    def begin_round(
        self, global_state: Mapping[str, torch.Tensor], module_of: ModuleOf
    ) -> RoundAggregator:
        self._module_of = module_of
        return self.inner.begin_round(global_state, module_of)

    def finish_round(
        self, global_state: Mapping[str, torch.Tensor], aggregate: RoundResult
    ) -> dict[str, torch.Tensor]:
        """x_{t+1} = x_t + step(Delta) on trained modules' float tensors, x_t elsewhere."""
        if self._module_of is None:
            raise RuntimeError(f"{self.name}: finish_round before begin_round")
        for key, glob in global_state.items():
            if _is_averaged(glob) and self._module_of(key) in aggregate.trained_modules:
                self._check_shapes(key, glob)
        averaged = self.inner.finish_round(global_state, aggregate)
        stepped = sorted({self._module_of(k) for k in global_state} & aggregate.trained_modules)
        for module in stepped:
            self._steps[module] = self._steps.get(module, 0) + 1
        out: dict[str, torch.Tensor] = {}
        for key, glob in global_state.items():
            module = self._module_of(key)
            if not _is_averaged(glob) or module not in aggregate.trained_modules:
                out[key] = glob
                continue
            x = glob.to(torch.float32)
            delta = averaged[key].to(torch.float32) - x
            out[key] = (x + self._step(key, delta, self._steps[module])).to(glob.dtype)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for slot, tensors in self._moments.items():
            for key, tensor in tensors.items():
                state[slot + key] = tensor.clone()
        for module, steps in self._steps.items():
            state[STEPS_PREFIX + module] = torch.tensor(steps, dtype=torch.int64)
        for key, tensor in self.inner.state_dict().items():
            state[INNER_PREFIX + key] = tensor
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the optimizer state by ``state``; anything malformed -> ValueError naming the
        key (and nothing is changed)."""
        moments: dict[str, dict[str, torch.Tensor]] = {slot: {} for slot in self._SLOTS}
        steps: dict[str, int] = {}
        inner: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            if name.startswith(INNER_PREFIX):
                inner[name[len(INNER_PREFIX) :]] = tensor
            elif name.startswith(STEPS_PREFIX):
                steps[name[len(STEPS_PREFIX) :]] = self._checked_steps(name, tensor)
            else:
                slot = next((s for s in self._SLOTS if name.startswith(s)), None)
                if slot is None:
                    raise ValueError(
                        f"{self.name} state has unknown key {name!r} (expected prefixes "
                        f"{[*self._SLOTS, STEPS_PREFIX, INNER_PREFIX]})"
                    )
                moments[slot][name[len(slot) :]] = self._checked_moment(name, tensor, slot)
        self._check_slots_agree(moments)
        self.inner.load_state_dict(inner)
        self._moments = {
            slot: {k: v.clone() for k, v in ts.items()} for slot, ts in moments.items()
        }
        self._steps = steps

    def peak_bytes(self, model_bytes: int, clients_per_round: int) -> int:
        """The inner aggregation's memory plus one float32 model-sized buffer per moment (an
        upper bound: moments exist only for floating tensors of modules that trained)."""
        return self.inner.peak_bytes(model_bytes, clients_per_round) + len(self._SLOTS) * int(
            model_bytes
        )

    # -- subclass hooks ----------------------------------------------------------------------
    def _step(self, key: str, delta: torch.Tensor, step: int) -> torch.Tensor:
        """The update added to x_t for one tensor (updates this key's moments)."""
        raise NotImplementedError

    # -- internals ---------------------------------------------------------------------------
    def _moment(self, slot: str, key: str, like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        tensor = self._moments[slot].get(key)
        if tensor is None:
            tensor = torch.full_like(like, fill, dtype=torch.float32)
            self._moments[slot][key] = tensor
        return tensor

    def _check_shapes(self, key: str, glob: torch.Tensor) -> None:
        for slot, tensors in self._moments.items():
            tensor = tensors.get(key)
            if tensor is not None and tensor.shape != glob.shape:
                raise ValueError(
                    f"{self.name} state {slot}{key} has shape {tuple(tensor.shape)}, the model's "
                    f"tensor has {tuple(glob.shape)}: the state belongs to another model"
                )

    def _checked_steps(self, name: str, tensor: torch.Tensor) -> int:
        if tensor.dtype != torch.int64 or tensor.dim() != 0 or int(tensor) < 0:
            raise ValueError(
                f"{self.name} state {name!r} must be a non-negative int64 scalar, got "
                f"{tensor.dtype} of shape {tuple(tensor.shape)}"
            )
        return int(tensor)

    def _checked_moment(self, name: str, tensor: torch.Tensor, slot: str) -> torch.Tensor:
        if tensor.dtype != torch.float32:
            raise ValueError(f"{self.name} state {name!r} must be float32, got {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{self.name} state {name!r} has non-finite values")
        if slot == SECOND_MOMENT_PREFIX and bool((tensor < 0).any()):
            raise ValueError(f"{self.name} state {name!r} (a second moment) has negative values")
        return tensor

    def _check_slots_agree(self, moments: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        if len(self._SLOTS) < 2:
            return
        first = moments[self._SLOTS[0]]
        for slot in self._SLOTS[1:]:
            other = moments[slot]
            unpaired = sorted(set(first) ^ set(other))
            if unpaired:
                raise ValueError(
                    f"{self.name} state has {unpaired[0]!r} in only one of {list(self._SLOTS)}"
                )
            for key, tensor in other.items():
                if tensor.shape != first[key].shape:
                    raise ValueError(
                        f"{self.name} state {slot}{key} has shape {tuple(tensor.shape)} but "
                        f"{self._SLOTS[0]}{key} has {tuple(first[key].shape)}"
                    )


class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al. 2019): u = momentum u + Delta; x += server_lr u.
    server_lr 1, momentum 0 is plain FedAvg."""

    name = "fedavgm"
    _SLOTS = (MOMENT_PREFIX,)

    def __init__(self, inner: Strategy, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        _check_positive("server_lr", server_lr)
        _check_rate("momentum", momentum, 0.0, 1.0, high_open=True)
        super().__init__(inner)
        self.server_lr = server_lr
        self.momentum = momentum

    def _step(self, key: str, delta: torch.Tensor, step: int) -> torch.Tensor:
        u = self._moment(MOMENT_PREFIX, key, delta)
        u.mul_(self.momentum).add_(delta)
        return u * self.server_lr


class _AdaptiveOptimizer(ServerOptimizer):
    """Reddi et al. Algorithm 2: m = beta1 m + (1 - beta1) Delta; v per subclass (v_{-1} =
    tau^2); x += eta m / (sqrt(v) + tau)."""

    _SLOTS = (MOMENT_PREFIX, SECOND_MOMENT_PREFIX)

    def __init__(
        self,
        inner: Strategy,
        server_lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        _check_positive("server_lr", server_lr)
        _check_rate("beta1", beta1, 0.0, 1.0, high_open=True)
        _check_rate("beta2", beta2, 0.0, 1.0, high_open=True)
        _check_positive("tau", tau)
        super().__init__(inner)
        self.server_lr = server_lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau

    def _step(self, key: str, delta: torch.Tensor, step: int) -> torch.Tensor:
        m = self._moment(MOMENT_PREFIX, key, delta)
        v = self._moment(SECOND_MOMENT_PREFIX, key, delta, fill=self.tau**2)
        m.mul_(self.beta1).add_(delta, alpha=1.0 - self.beta1)
        self._second_moment(v, delta * delta)
        return m / (v.sqrt() + self.tau) * self.server_lr

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        raise NotImplementedError


class FedAdagrad(_AdaptiveOptimizer):
    """v = v + Delta^2."""

    name = "fedadagrad"

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.add_(delta_sq)


class FedAdam(_AdaptiveOptimizer):
    """v = beta2 v + (1 - beta2) Delta^2."""

    name = "fedadam"

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.mul_(self.beta2).add_(delta_sq, alpha=1.0 - self.beta2)


class FedYogi(_AdaptiveOptimizer):
    """v = v - (1 - beta2) Delta^2 sign(v - Delta^2) (additive, so v cannot drop below zero
    and grows no faster than Adam's)."""

    name = "fedyogi"

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.sub_(delta_sq * torch.sign(v - delta_sq), alpha=1.0 - self.beta2)


__all__ = ["FedAdagrad", "FedAdam", "FedAvgM", "FedYogi", "ServerOptimizer"]
