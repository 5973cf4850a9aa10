"""Hypothesis strategies shared by the wire tests: random named tensor sets of every wire dtype."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

WIRE_DTYPES: list[torch.dtype] = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
]

shapes = st.lists(st.integers(min_value=0, max_value=6), min_size=0, max_size=3).map(tuple)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A tensor whose bytes are random (NaN/Inf patterns included for floats); bools are 0/1."""
    gen = torch.Generator().manual_seed(seed)
    numel = 1
    for dim in shape:
        numel *= dim
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).to(torch.bool)
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * size,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape) if numel else torch.empty(shape, dtype=dtype)


@st.composite
def tensor_sets(draw: st.DrawFn, max_tensors: int = 5) -> dict[str, torch.Tensor]:
    names = draw(
        st.lists(
            st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__"),
            min_size=0,
            max_size=max_tensors,
            unique=True,
        )
    )
    return {
        name: random_tensor(
            draw(st.sampled_from(WIRE_DTYPES)), draw(shapes), draw(st.integers(0, 2**31))
        )
        for name in names
    }


metadata_maps = st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=3)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN-safe), plus equal dtype and shape."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
