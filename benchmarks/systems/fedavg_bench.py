"""Streaming FedAvg (eq. 15) throughput vs numpy in-place ``acc += w * x`` over the same bytes,
through the server engineer's benchmarks/fedavg_throughput.py (imported, not copied)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import fedavg_throughput  # benchmarks/ is on sys.path (run_systems.py puts it there)
import torch

from systems.measurement_records import (
    LoadSample,
    Measurement,
    Target,
    load_average,
    median,
    safe_ratio,
)

FEDAVG_TARGET = Target("ratio", ">=", 0.8)


@dataclass(frozen=True)
class FedAvgSettings:
    """Model size and repetitions (the server folds with 1 torch thread, so do we)."""

    model_mib: int = 128
    tensors: int = 16
    clients: int = 4
    repeats: int = 5
    torch_threads: int = 1


def measure_fedavg(
    settings: FedAvgSettings, advance: Callable[[], None] = lambda: None
) -> Measurement:
    """Alternate numpy and StreamingFedAvg runs (same load for both); report medians."""
    before = load_average()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.torch_threads)
    try:
        glob = fedavg_throughput._model(settings.model_mib, settings.tensors, 0)
        updates = [
            fedavg_throughput._model(settings.model_mib, settings.tensors, seed + 1)
            for seed in range(settings.clients)
        ]
        fedavg_throughput._run_numpy(glob, updates)  # warm-up: page faults, allocator
        fedavg_throughput._run_streaming(glob, updates)
        numpy_s: list[float] = []
        stream_s: list[float] = []
        for _ in range(settings.repeats):
            numpy_s.append(fedavg_throughput._run_numpy(glob, updates))
            stream_s.append(fedavg_throughput._run_streaming(glob, updates))
            advance()
    finally:
        torch.set_num_threads(previous_threads)
    folded_gib = settings.model_mib * settings.clients / 1024
    stream_rates = [folded_gib / s for s in stream_s]
    numpy_rates = [folded_gib / s for s in numpy_s]
    value, baseline = median(stream_rates), median(numpy_rates)
    return Measurement(
        key="fedavg_throughput",
        title="Streaming FedAvg fold (eq. 15)",
        value=value,
        unit="GiB/s",
        baseline=baseline,
        baseline_unit="GiB/s",
        baseline_label="numpy in-place `acc += w * x` over the same updates",
        ratio=safe_ratio(value, baseline),
        ratio_definition="StreamingFedAvg.add throughput / numpy throughput",
        target=FEDAVG_TARGET,
        load=LoadSample(before, load_average()),
        samples=stream_rates,
        baseline_samples=numpy_rates,
        details={
            "model_mib": settings.model_mib,
            "updates_per_repeat": settings.clients,
            "tensors": settings.tensors,
            "torch_threads": settings.torch_threads,
            "repeats": settings.repeats,
        },
    )
