"""Walking a flattened tensor in bounded parts, so that widening it to float64 (update bound,
robust rules) never copies a whole tensor at once."""

from __future__ import annotations


def tensor_parts(numel: int, part_elements: int) -> list[slice]:
    """Consecutive slices of at most ``part_elements`` (>= 1) covering ``range(numel)``."""
    step = max(1, part_elements)
    return [slice(start, min(start + step, numel)) for start in range(0, numel, step)]
