"""What one systems measurement reports (value, same-run baseline, ratio, target, machine load)
and how a whole suite run is written out as JSON."""

from __future__ import annotations

import math
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Comparison = Literal[">=", "<="]


class BenchmarkError(RuntimeError):
    """A benchmark could not produce a number (setup failed, server died, bad option)."""


@dataclass(frozen=True)
class Target:
    """A pass/fail line: ``on`` ("ratio" or "value") compared with ``threshold``."""

    on: Literal["ratio", "value"]
    comparison: Comparison
    threshold: float

    def met_by(self, value: float, ratio: float) -> bool:
        """True if the measured figure satisfies the target."""
        figure = ratio if self.on == "ratio" else value
        if not math.isfinite(figure):
            return False
        return figure >= self.threshold if self.comparison == ">=" else figure <= self.threshold

    def describe(self, unit: str) -> str:
        """Human form, e.g. 'ratio >= 0.8' or '<= 0.5 s/round'."""
        if self.on == "ratio":
            return f"ratio {self.comparison} {self.threshold:g}"
        return f"{self.comparison} {self.threshold:g} {unit}"


@dataclass(frozen=True)
class LoadSample:
    """1-minute load average before and after a measurement (the machine is shared)."""

    before: float
    after: float

    @property
    def worst(self) -> float:
        return max(self.before, self.after)


def load_average() -> float:
    """The 1-minute load average (0.0 where the OS does not provide one)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


@dataclass
class Measurement:
    """One figure: ``value`` (median of ``samples``) against ``baseline`` from the same run.

    ``ratio`` is defined per measurement (``ratio_definition`` says how); higher-is-better or
    lower-is-better is expressed by the ``target``.
    """

    key: str
    title: str
    value: float
    unit: str
    baseline: float
    baseline_unit: str
    baseline_label: str
    ratio: float
    ratio_definition: str
    target: Target | None
    load: LoadSample
    samples: list[float] = field(default_factory=list)
    baseline_samples: list[float] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def target_met(self) -> bool | None:
        """Whether the target is met (None when this figure has no target)."""
        return None if self.target is None else self.target.met_by(self.value, self.ratio)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able dict (NaN/inf become None: JSON has no such numbers)."""
        out = asdict(self)
        out["target"] = None if self.target is None else asdict(self.target)
        out["target_text"] = None if self.target is None else self.target.describe(self.unit)
        out["target_met"] = self.target_met
        return _finite(out)  # type: ignore[no-any-return]


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def median(values: Sequence[float]) -> float:
    """Median, NaN for no values (a failed measurement stays visibly failed)."""
    return statistics.median(values) if values else float("nan")


def safe_ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is 0 or either is not finite."""
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator == 0:
        return float("nan")
    return numerator / denominator


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (CPU count, versions)."""
    import grpc
    import torch

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpc": grpc.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def measurement_from_json(data: dict[str, Any]) -> Measurement:
    """Inverse of `Measurement.to_json` (None numbers come back as NaN)."""

    def num(value: Any) -> float:
        return float("nan") if value is None else float(value)

    target = data.get("target")
    load = data["load"]
    return Measurement(
        key=data["key"],
        title=data["title"],
        value=num(data["value"]),
        unit=data["unit"],
        baseline=num(data["baseline"]),
        baseline_unit=data["baseline_unit"],
        baseline_label=data["baseline_label"],
        ratio=num(data["ratio"]),
        ratio_definition=data["ratio_definition"],
        target=None if target is None else Target(**target),
        load=LoadSample(num(load["before"]), num(load["after"])),
        samples=[num(v) for v in data.get("samples", [])],
        baseline_samples=[num(v) for v in data.get("baseline_samples", [])],
        details=dict(data.get("details", {})),
    )


@dataclass
class SuiteRun:
    """A whole run of the systems suite: settings, machine, measurements, and failures."""

    profile: str
    started_unix_s: float
    machine: dict[str, Any]
    measurements: list[Measurement] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # benchmark -> error line
    skipped: dict[str, str] = field(default_factory=dict)  # benchmark -> why
    finished_unix_s: float = 0.0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SuiteRun:
        """Read back what `to_json` wrote (to re-render plots and markdown without re-running)."""
        if data.get("suite") != "systems":
            raise BenchmarkError(f"not a systems suite result (suite={data.get('suite')!r})")
        return cls(
            profile=str(data["profile"]),
            started_unix_s=float(data["started_unix_s"]),
            machine=dict(data["machine"]),
            measurements=[measurement_from_json(m) for m in data["measurements"]],
            failures=dict(data.get("failures", {})),
            skipped=dict(data.get("skipped", {})),
            finished_unix_s=float(data.get("finished_unix_s") or 0.0),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "suite": "systems",
            "profile": self.profile,
            "started_unix_s": self.started_unix_s,
            "finished_unix_s": self.finished_unix_s,
            "machine": self.machine,
            "measurements": [m.to_json() for m in self.measurements],
            "failures": dict(self.failures),
            "skipped": dict(self.skipped),
        }
