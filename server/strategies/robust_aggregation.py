"""Byzantine-robust aggregation: coordinate-wise median, trimmed mean, Krum / Multi-Krum and
the median-anchored mean.

Unlike streaming FedAvg (eq. 15) these rules need every upload at once, so the aggregator
buffers each upload's contributed tensors: server memory is about clients x model, stated by
``peak_bytes`` and refused up front by ``check_fits`` (and at run time by ``max_buffer_bytes``).

Module-aware: each module is aggregated over the uploads with weight > 0 on it; a module nobody
trained keeps its global value; integer buffers are never aggregated. The rules are unweighted
on purpose: sample counts are claimed by the client, and weighting by them would let a single
Byzantine client claim a huge n and dominate (the very thing these rules exist to resist).
Krum needs n > 2f + 2 uploads on a module; with fewer, that module falls back to the median
(counted in ``RoundResult.values["krum_median_fallback_modules"]``) rather than stalling a
round in which few clients hold that modality.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import torch
from crossfed.server.errors import InvalidUpdateError, ServerError, StatusKind
from crossfed.server.strategies.base import ModuleOf, RoundInstructions, RoundResult
from crossfed.server.tensor_parts import tensor_parts

#: Coordinates x uploads stacked at once while aggregating, whatever the model's largest
#: tensor. Transient memory per chunk: the float64 stack plus the sort's float64 values and
#: int64 indices (Krum: the stack and its square), so 3 x 8 bytes per stacked element.
CHUNK_ELEMENTS = 1 << 20
CHUNK_BYTES = 3 * 8 * CHUNK_ELEMENTS
#: anchored_mean leaves a client out once dropped in this many rounds (and in at least half
#: of its rounds): measured at the headline cell, sign flips by 2 of 10 clients then cost
#: what withholding their data costs (about 1 point), and no honest client was left out in
#: the clean runs (headline cell and per-client alpha 0.1, BENCHMARKS.md).
DEFAULT_EXCLUDE_AFTER = 2


class MemoryBudgetError(ServerError, ValueError):
    """A buffering aggregator would need more memory than its budget allows."""

    status = StatusKind.RESOURCE_EXHAUSTED


def buffered_peak_bytes(model_bytes: int, clients_per_round: int) -> int:
    """Memory of one buffered round beyond the global model: every client's copy of the model,
    the aggregated output, and the bounded stacking chunk."""
    return int(clients_per_round) * int(model_bytes) + int(model_bytes) + CHUNK_BYTES


def check_fits(name: str, model_bytes: int, clients_per_round: int, budget_bytes: int) -> None:
    """Refuse a configuration whose buffered round cannot fit in ``budget_bytes``."""
    need = buffered_peak_bytes(model_bytes, clients_per_round)
    if need > budget_bytes:
        raise MemoryBudgetError(
            f"strategy {name!r} buffers every upload: {clients_per_round} clients x "
            f"{model_bytes:,} model bytes needs {need:,} bytes, over the budget of "
            f"{budget_bytes:,} bytes; lower clients_per_round or use a streaming strategy "
            "(fedavg)"
        )


def _is_averaged(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def _chunks(numel: int, uploads: int) -> list[slice]:
    """Parts of one tensor sized so that ``uploads`` float64 rows of a part fit the chunk."""
    return tensor_parts(numel, CHUNK_ELEMENTS // max(uploads, 1))


def _stacked(values: list[torch.Tensor], part: slice) -> torch.Tensor:
    """[n, chunk] float64 view of one chunk of every upload's flattened tensor."""
    return torch.stack([v.reshape(-1)[part].to(torch.float64) for v in values])


def coordinate_median(values: list[torch.Tensor]) -> torch.Tensor:
    """Per coordinate, the median of the uploads (mean of the two middle ones for even n)."""
    return trimmed_mean(values, (len(values) - 1) // 2)


def trimmed_mean(values: list[torch.Tensor], trim: int) -> torch.Tensor:
    """Per coordinate, the mean after dropping the ``trim`` highest and lowest values."""
    n = len(values)
    if not 0 <= 2 * trim < n:
        raise ValueError(f"cannot trim {trim} from each end of {n} values")
    like = values[0]
    out = torch.empty(like.numel(), dtype=torch.float64)
    for part in _chunks(like.numel(), n):
        out[part] = _trimmed_rows(_stacked(values, part), trim)
    return out.reshape(like.shape).to(like.dtype)


def _trimmed_rows(rows: torch.Tensor, trim: int) -> torch.Tensor:
    """Per column of ``rows`` [n, c], the mean after dropping the ``trim`` highest and lowest."""
    n = rows.shape[0]
    return rows.sort(dim=0).values[trim : n - trim].mean(dim=0)


def pairwise_sq_distances(uploads: list[list[torch.Tensor]]) -> torch.Tensor:
    """[n, n] squared L2 distances between uploads, each a list of a module's tensors."""
    n = len(uploads)
    dist = torch.zeros(n, n, dtype=torch.float64)
    for t in range(len(uploads[0])):
        values = [u[t] for u in uploads]
        for part in _chunks(values[0].numel(), n):
            x = _stacked(values, part)
            sq = (x * x).sum(dim=1)
            dist += (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
    return dist


def krum_select(dist: torch.Tensor, num_byzantine: int, num_selected: int) -> list[int]:
    """Indices of the ``num_selected`` uploads with the lowest Krum score (sum of squared
    distances to the n - f - 2 nearest others; Blanchard et al. 2017)."""
    n = dist.shape[0]
    nearest = n - num_byzantine - 2
    others = dist + torch.diag(torch.full((n,), math.inf, dtype=dist.dtype))
    scores = others.sort(dim=1).values[:, :nearest].sum(dim=1)
    order = sorted(range(n), key=lambda i: (float(scores[i]), i))
    return sorted(order[:num_selected])


class RobustRule(Protocol):
    """How one module's buffered uploads become its aggregate."""

    name: str

    def aggregate(
        self,
        keys: list[str],
        base: list[torch.Tensor],
        uploads: list[list[torch.Tensor]],
        values: dict[str, float],
        clients: list[str],
    ) -> list[torch.Tensor]:
        """``uploads[i][t]`` is upload i's tensor for ``keys[t]`` (sent by ``clients[i]``),
        ``base[t]`` the global model's; returns one per key."""
        ...


class MedianRule:
    name = "median"

    def aggregate(
        self,
        keys: list[str],
        base: list[torch.Tensor],
        uploads: list[list[torch.Tensor]],
        values: dict[str, float],
        clients: list[str],
    ) -> list[torch.Tensor]:
        return [coordinate_median([u[t] for u in uploads]) for t in range(len(keys))]


class TrimmedMeanRule:
    name = "trimmed_mean"

    def __init__(self, trim_ratio: float) -> None:
        if not (math.isfinite(trim_ratio) and 0.0 <= trim_ratio < 0.5):
            raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
        self.trim_ratio = trim_ratio

    def aggregate(
        self,
        keys: list[str],
        base: list[torch.Tensor],
        uploads: list[list[torch.Tensor]],
        values: dict[str, float],
        clients: list[str],
    ) -> list[torch.Tensor]:
        trim = math.floor(self.trim_ratio * len(uploads))
        return [trimmed_mean([u[t] for u in uploads], trim) for t in range(len(keys))]


class KrumRule:
    """Krum keeps the one upload with the lowest score; Multi-Krum (``num_selected`` None)
    averages the n - f lowest, dropping as many uploads as it tolerates attackers."""

    def __init__(self, num_byzantine: int, num_selected: int | None) -> None:
        if num_byzantine < 0:
            raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
        if num_selected is not None and num_selected < 1:
            raise ValueError(f"num_selected must be >= 1, got {num_selected}")
        self.num_byzantine = num_byzantine
        self.num_selected = num_selected
        self.name = "krum" if num_selected == 1 else "multi_krum"

    def aggregate(
        self,
        keys: list[str],
        base: list[torch.Tensor],
        uploads: list[list[torch.Tensor]],
        values: dict[str, float],
        clients: list[str],
    ) -> list[torch.Tensor]:
        n, f = len(uploads), self.num_byzantine
        if n <= 2 * f + 2:
            values["krum_median_fallback_modules"] = (
                values.get("krum_median_fallback_modules", 0.0) + 1.0
            )
            return MedianRule().aggregate(keys, base, uploads, values, clients)
        keep = n - f if self.num_selected is None else min(self.num_selected, n - f)
        chosen = krum_select(pairwise_sq_distances(uploads), f, keep)
        out = []
        for t in range(len(keys)):
            total = torch.zeros(uploads[0][t].shape, dtype=torch.float64)
            for i in chosen:
                total += uploads[i][t].to(torch.float64)
            out.append((total / len(chosen)).to(uploads[0][t].dtype))
        return out


class DropRecord:
    """Per client, in how many rounds the anchored mean heard it and in how many it dropped it
    (at least half of the client's module uploads that round), over the run. A client dropped
    in at least ``exclude_after`` rounds, at least half of those it took part in, is left out
    from the next round on (0: nobody is).

    Why: a sign-flipped update points against the median in the first rounds and is dropped,
    but as the global model moves away from the attackers' data the negation of their honest
    pull lines up with the majority, and no per-round rule tells them apart any more (measured:
    honest cosines down to 0.02, late attackers 0.2-0.27). Remembering the early evidence
    does. An honest client whose data points elsewhere is dropped too, and left out once it is
    dropped in at least half of its uploads; its counts freeze while it is left out. Uploads
    from "" (no client id) are never counted."""

    PREFIX = "anchored_drops/"

    def __init__(self, exclude_after: int = 0) -> None:
        if exclude_after < 0:
            raise ValueError(f"exclude_after must be >= 0, got {exclude_after}")
        self.exclude_after = exclude_after
        self.heard: dict[str, int] = {}
        self.dropped: dict[str, int] = {}

    def note(self, client: str, dropped: bool) -> None:
        """One round of ``client``'s."""
        if client:
            self.heard[client] = self.heard.get(client, 0) + 1
            self.dropped[client] = self.dropped.get(client, 0) + int(dropped)

    def excluded(self) -> frozenset[str]:
        if self.exclude_after <= 0:
            return frozenset()
        return frozenset(
            c
            for c, drops in self.dropped.items()
            if drops >= self.exclude_after and 2 * drops >= self.heard[c]
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            f"{self.PREFIX}{c}": torch.tensor([self.heard[c], self.dropped[c]], dtype=torch.int64)
            for c in sorted(self.heard)
        }

    def load_tensors(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore `to_tensors`' output; anything else is refused (ValueError)."""
        heard: dict[str, int] = {}
        dropped: dict[str, int] = {}
        for key, value in state.items():
            client = key.removeprefix(self.PREFIX)
            if client == key or not client or value.shape != (2,) or value.is_floating_point():
                raise ValueError(f"not an anchored_mean drop record: {key!r}")
            h, d = (int(x) for x in value.tolist())
            if not 0 <= d <= h:
                raise ValueError(f"drop record {key!r} has {d} drops of {h} uploads")
            heard[client], dropped[client] = h, d
        self.heard, self.dropped = heard, dropped


class AnchoredMeanRule:
    """Median-anchored mean: an upload whose update points away from the coordinate-wise median
    update (cosine <= 0) is dropped; the rest are clipped to the median update norm and averaged.

    Why: when honest updates are noisy (non-IID clients, one local epoch) a sign-flipped update
    is about as far from the honest ones in L2 as they are from each other, so Krum keeps it and
    the median is shifted by it, yet it points against the honest direction. The anchor stands
    in for FLTrust's update on server-held root data (Cao et al. 2021), which a server without
    data cannot compute; norm clipping bounds a boosted update to an honest size.
    """

    name = "anchored_mean"

    def __init__(self, exclude_after: int = 0) -> None:
        self.record = DropRecord(exclude_after)
        self._excluded: frozenset[str] = frozenset()
        self._round: dict[str, list[int]] = {}  # client -> [module uploads heard, dropped]

    def begin_round(self) -> None:
        """Fix who is left out of this round (the record as the last round left it)."""
        self._excluded = self.record.excluded()
        self._round = {}

    def end_round(self) -> None:
        """Note each client heard this round in the record."""
        for client, (heard, dropped) in sorted(self._round.items()):
            self.record.note(client, dropped=2 * dropped >= heard)
        self._round = {}

    def aggregate(
        self,
        keys: list[str],
        base: list[torch.Tensor],
        uploads: list[list[torch.Tensor]],
        values: dict[str, float],
        clients: list[str],
    ) -> list[torch.Tensor]:
        heard = [i for i, c in enumerate(clients) if c not in self._excluded]
        if len(heard) < len(uploads):
            values["anchored_excluded_uploads"] = values.get("anchored_excluded_uploads", 0.0) + (
                len(uploads) - len(heard)
            )
            if not heard:  # every uploader of this module is left out: it keeps its value
                return [b.clone() for b in base]
            uploads, clients = [uploads[i] for i in heard], [clients[i] for i in heard]
        n = len(uploads)
        middle = (n - 1) // 2
        dots = torch.zeros(n, dtype=torch.float64)
        sq_norms = torch.zeros(n, dtype=torch.float64)
        anchor_sq = 0.0
        for t in range(len(keys)):
            flat_base = base[t].reshape(-1).to(torch.float64)
            tensors = [u[t] for u in uploads]
            for part in _chunks(flat_base.numel(), n):
                deltas = _stacked(tensors, part) - flat_base[part]
                anchor = _trimmed_rows(deltas, middle)
                dots += deltas @ anchor
                sq_norms += (deltas * deltas).sum(dim=1)
                anchor_sq += float((anchor * anchor).sum())
        norms = sq_norms.sqrt()
        denominator = (norms * math.sqrt(anchor_sq)).clamp_min(torch.finfo(torch.float64).tiny)
        keep = [i for i in range(n) if anchor_sq > 0.0 and float(dots[i] / denominator[i]) > 0.0]
        values["anchored_dropped_uploads"] = values.get("anchored_dropped_uploads", 0.0) + (
            n - len(keep)
        )
        if not keep:  # nothing points along the anchor (e.g. no upload moved): the median
            return MedianRule().aggregate(keys, base, uploads, values, clients)
        kept = set(keep)
        for i, client in enumerate(clients):
            tally = self._round.setdefault(client, [0, 0])
            tally[0] += 1
            tally[1] += int(i not in kept)
        bound = float(_trimmed_rows(norms[:, None], middle)[0])
        factors = {i: min(1.0, bound / float(norms[i])) if norms[i] > 0 else 1.0 for i in keep}
        out = []
        for t, glob in enumerate(base):
            wide = glob.to(torch.float64)
            step = torch.zeros_like(wide)
            for i in keep:
                step += factors[i] * (uploads[i][t].to(torch.float64) - wide)
            out.append((wide + step / len(keep)).to(glob.dtype))
        return out


class BufferedAggregator:
    """RoundAggregator that keeps every upload's contributed tensors, then applies ``rule``
    per module over the uploads that trained it."""

    def __init__(
        self,
        global_state: Mapping[str, torch.Tensor],
        module_of: ModuleOf,
        rule: RobustRule,
        max_buffer_bytes: int | None = None,
    ) -> None:
        self._global = dict(global_state)
        self._module_of_key = {k: module_of(k) for k in self._global}
        self.modules: frozenset[str] = frozenset(
            m for k, m in self._module_of_key.items() if _is_averaged(self._global[k])
        )
        self.rule = rule
        self.max_buffer_bytes = max_buffer_bytes
        self.buffered_bytes = 0
        self._buffer: dict[str, list[torch.Tensor]] = {}
        self._senders: dict[str, list[str]] = {}  # module -> who sent each buffered upload
        self.num_updates = 0
        self.total_samples = 0
        self._finished = False

    def contributed_keys(self, weights: Mapping[str, float]) -> list[str]:
        return [
            key
            for key, glob in self._global.items()
            if _is_averaged(glob) and float(weights.get(self._module_of_key[key], 0.0)) > 0.0
        ]

    def add(
        self,
        update: Mapping[str, torch.Tensor],
        weights: Mapping[str, float],
        num_samples: int,
        scale: float = 1.0,
        client: str = "",
    ) -> None:
        """Buffer theta_g + scale (theta_i - theta_g) for every contributed key."""
        if self._finished:
            raise RuntimeError("this round's aggregator already produced its result")
        if not (math.isfinite(scale) and 0.0 <= scale <= 1.0):
            raise ValueError(f"scale must be in [0, 1], got {scale}")
        keys = self.contributed_keys(weights)
        incoming = 0
        for key in keys:
            value = update.get(key)
            glob = self._global[key]
            if value is None or value.shape != glob.shape:
                got = "missing" if value is None else f"shape {tuple(value.shape)}"
                raise InvalidUpdateError(
                    f"update tensor {key!r} is {got}; the model's is {tuple(glob.shape)}"
                )
            incoming += glob.numel() * glob.element_size()
        cap = self.max_buffer_bytes
        if cap is not None and self.buffered_bytes + incoming > cap:
            raise MemoryBudgetError(
                f"{self.rule.name}: buffering upload {self.num_updates + 1} "
                f"({incoming:,} bytes) would hold {self.buffered_bytes + incoming:,} bytes, "
                f"over max_buffer_bytes={cap:,}"
            )
        for key in keys:
            glob = self._global[key]
            value = update[key]
            if scale < 1.0:
                wide = torch.lerp(glob.to(torch.float64), value.to(torch.float64), scale)
                stored = wide.to(glob.dtype)
            else:
                stored = value.to(glob.dtype, copy=True)
            self._buffer.setdefault(key, []).append(stored.contiguous())
        for module in dict.fromkeys(self._module_of_key[k] for k in keys):
            self._senders.setdefault(module, []).append(client)
        self.buffered_bytes += incoming
        self.num_updates += 1
        self.total_samples += int(num_samples)

    def result(self) -> RoundResult:
        """Apply the rule per module; buffers are released as each module is done."""
        if self._finished:
            raise RuntimeError("this round's aggregator already produced its result")
        self._finished = True
        out = dict(self._global)
        values: dict[str, float] = {}
        trained: set[str] = set()
        by_module: dict[str, list[str]] = {}
        for key in self._buffer:
            by_module.setdefault(self._module_of_key[key], []).append(key)
        for module, keys in sorted(by_module.items()):
            per_key = [self._buffer.pop(k) for k in keys]
            uploads = [[tensors[i] for tensors in per_key] for i in range(len(per_key[0]))]
            del per_key
            base = [self._global[k] for k in keys]
            merged = self.rule.aggregate(keys, base, uploads, values, self._senders[module])
            for key, value in zip(keys, merged, strict=True):
                out[key] = value
            values[f"uploads.{module}"] = float(len(uploads))
            trained.add(module)
        self.buffered_bytes = 0
        return RoundResult(state=out, trained_modules=frozenset(trained), values=values)


class RobustStrategy:
    """A stateless strategy whose round aggregates with a buffered robust ``rule``."""

    def __init__(self, rule: RobustRule, max_buffer_bytes: int | None = None) -> None:
        if max_buffer_bytes is not None and max_buffer_bytes <= 0:
            raise ValueError(f"max_buffer_bytes must be > 0, got {max_buffer_bytes}")
        self.rule = rule
        self.name = rule.name
        self.max_buffer_bytes = max_buffer_bytes

    def configure_round(self, round_no: int) -> RoundInstructions:
        return RoundInstructions()

    def begin_round(
        self, global_state: Mapping[str, torch.Tensor], module_of: ModuleOf
    ) -> BufferedAggregator:
        return BufferedAggregator(global_state, module_of, self.rule, self.max_buffer_bytes)

    def finish_round(
        self, global_state: Mapping[str, torch.Tensor], aggregate: RoundResult
    ) -> dict[str, torch.Tensor]:
        return dict(aggregate.state)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} has no state, got key {min(state)!r}")

    def peak_bytes(self, model_bytes: int, clients_per_round: int) -> int:
        return buffered_peak_bytes(model_bytes, clients_per_round)

    def check_fits(self, model_bytes: int, clients_per_round: int, budget_bytes: int) -> None:
        """MemoryBudgetError (a ValueError) naming the numbers when a round cannot fit."""
        check_fits(self.name, model_bytes, clients_per_round, budget_bytes)


class MedianStrategy(RobustStrategy):
    """Coordinate-wise median (Yin et al. 2018)."""

    def __init__(self, max_buffer_bytes: int | None = None) -> None:
        super().__init__(MedianRule(), max_buffer_bytes)


class TrimmedMeanStrategy(RobustStrategy):
    """Coordinate-wise trimmed mean: drop floor(beta n) highest and lowest, average the rest."""

    def __init__(self, trim_ratio: float = 0.2, max_buffer_bytes: int | None = None) -> None:
        super().__init__(TrimmedMeanRule(trim_ratio), max_buffer_bytes)


class KrumStrategy(RobustStrategy):
    """Krum (num_selected 1) / Multi-Krum (None: all but f): average the uploads with the
    lowest Krum scores (Blanchard et al. 2017)."""

    def __init__(
        self,
        num_byzantine: int = 1,
        num_selected: int | None = 1,
        max_buffer_bytes: int | None = None,
    ) -> None:
        super().__init__(KrumRule(num_byzantine, num_selected), max_buffer_bytes)


class AnchoredMeanStrategy(RobustStrategy):
    """Median-anchored mean (see AnchoredMeanRule): drops uploads pointing away from the
    median update, clips the rest to the median update norm, averages them; with
    ``exclude_after`` > 0 (default `DEFAULT_EXCLUDE_AFTER`) it also leaves out the clients
    it keeps dropping (`DropRecord`), a record checkpointed with the round."""

    def __init__(
        self, exclude_after: int = DEFAULT_EXCLUDE_AFTER, max_buffer_bytes: int | None = None
    ) -> None:
        self.anchored = AnchoredMeanRule(exclude_after)
        super().__init__(self.anchored, max_buffer_bytes)

    def begin_round(
        self, global_state: Mapping[str, torch.Tensor], module_of: ModuleOf
    ) -> BufferedAggregator:
        self.anchored.begin_round()
        return super().begin_round(global_state, module_of)

    def finish_round(
        self, global_state: Mapping[str, torch.Tensor], aggregate: RoundResult
    ) -> dict[str, torch.Tensor]:
        """Like the other rules; the round's drops go into the record here (like a server
        optimizer's state, it is checkpointed with the round this makes)."""
        self.anchored.end_round()
        return super().finish_round(global_state, aggregate)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.anchored.record.to_tensors()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.anchored.record.load_tensors(state)


__all__ = [
    "AnchoredMeanStrategy",
    "BufferedAggregator",
    "DropRecord",
    "KrumStrategy",
    "MedianStrategy",
    "MemoryBudgetError",
    "RobustStrategy",
    "TrimmedMeanStrategy",
    "buffered_peak_bytes",
    "check_fits",
]
