"""The numbers every report uses (design card, "How we judge the method"): best baseline,
unimodal ceiling and gap-closure = (ours - best baseline) / (ceiling - best baseline), per
seed, then mean +- std over seeds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

CONFIGS = ("text_only", "image_only", "both")
MISSING_CONFIGS = ("text_only", "image_only")
CEILING_OF = {"text_only": "ceiling_text", "image_only": "ceiling_image"}
FED_CEILING_OF = {"text_only": "fed_ceiling_text", "image_only": "fed_ceiling_image"}
_REFERENCES = ("ours", "zero_fill", "dropout")
_REFERENCE_PREFIXES = ("ceiling", "central", "fed_ceiling")


def _is_variant(name: str) -> bool:
    """An ablation or other variant of ours (compared with ours on the same seed)."""
    return name not in _REFERENCES and not name.startswith(_REFERENCE_PREFIXES)


def gap_closure(ours: float, best_baseline: float, ceiling: float) -> float:
    """(ours - b) / (ceiling - b); NaN when the baseline already sits at the ceiling (no
    room: the dataset cannot show the method there)."""
    room = ceiling - best_baseline
    if abs(room) < 1e-9 or any(math.isnan(v) for v in (ours, best_baseline, ceiling)):
        return float("nan")
    return (ours - best_baseline) / room


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation over seeds (NaNs dropped, n = values kept)."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> MeanStd:
        vals = [float(v) for v in values if not math.isnan(float(v))]
        if not vals:
            return cls(float("nan"), float("nan"), 0)
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return cls(statistics.mean(vals), sd, len(vals))

    def text(self, digits: int = 3) -> str:
        if self.n == 0:
            return "n/a"
        if self.n == 1:
            return f"{self.mean:.{digits}f} (1 seed)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "n": float(self.n)}


Scores = Mapping[str, Mapping[str, float]]


def seed_summary(
    by_method: Mapping[str, Scores], metric: str = "accuracy"
) -> dict[str, dict[str, float]]:
    """One seed's per-configuration numbers: ours, each baseline, the best baseline (the
    better of zero-fill and dropout FedAvg), ceiling and gap-closure (missing configs), and
    where run, the federated unimodal ceiling and the gap-closure measured against it."""
    out: dict[str, dict[str, float]] = {}
    for c in CONFIGS:
        row: dict[str, float] = {}
        for name, scores in by_method.items():
            row[name] = float(scores[c][metric])
        if "ours" in row:
            for name in filter(_is_variant, by_method):
                # ours minus an ablation on the same seed (paired comparison)
                row[f"delta:{name}"] = row["ours"] - row[name]
        base = [row[b] for b in ("zero_fill", "dropout") if b in row]
        row["best_baseline"] = max(base) if base else float("nan")
        if c in CEILING_OF and CEILING_OF[c] in row and "ours" in row:
            row["ceiling"] = row[CEILING_OF[c]]
            row["gap_closure"] = gap_closure(row["ours"], row["best_baseline"], row["ceiling"])
            for name in filter(_is_variant, by_method):
                row[f"gap_closure:{name}"] = gap_closure(
                    row[name], row["best_baseline"], row["ceiling"]
                )
        if c in FED_CEILING_OF and FED_CEILING_OF[c] in row and "ours" in row:
            row["fed_ceiling"] = row[FED_CEILING_OF[c]]
            row["fed_gap_closure"] = gap_closure(
                row["ours"], row["best_baseline"], row["fed_ceiling"]
            )
        out[c] = row
    return out


def aggregate_seeds(
    per_seed: list[dict[str, dict[str, float]]],
) -> dict[str, dict[str, MeanStd]]:
    """Mean +- std over seeds of every number `seed_summary` produced."""
    out: dict[str, dict[str, MeanStd]] = {}
    for c in CONFIGS:
        keys = sorted({k for s in per_seed for k in s.get(c, {})})
        out[c] = {k: MeanStd.of(s[c][k] for s in per_seed if k in s.get(c, {})) for k in keys}
    return out
