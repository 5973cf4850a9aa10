"""tensor_validation: each rejection names the key and says what was expected."""

from __future__ import annotations

import pytest
import torch
from crossfed.common.wire.errors import TensorValidationError
from crossfed.common.wire.tensor_codec import supported_dtypes
from crossfed.common.wire.tensor_validation import TensorSpec, spec_of, validate_tensors

MODEL = {
    "fc.weight": torch.randn(4, 3),
    "fc.bias": torch.zeros(4),
    "steps": torch.tensor(3, dtype=torch.int64),
    "mask": torch.tensor([True, False]),
}
SPEC = spec_of(MODEL)


def test_spec_of_records_dtype_and_shape() -> None:
    assert SPEC["fc.weight"] == TensorSpec(torch.float32, (4, 3))
    assert SPEC["steps"] == TensorSpec(torch.int64, ())


def test_matching_tensors_pass() -> None:
    validate_tensors({k: v.clone() for k, v in MODEL.items()}, SPEC, max_abs=100.0)


@pytest.mark.parametrize(
    ("received", "kwargs", "fragment"),
    [
        ({**MODEL, "extra": torch.ones(1)}, {}, "unexpected tensor 'extra'"),
        ({"fc.weight": MODEL["fc.weight"]}, {}, "missing tensor 'fc.bias', 'mask', 'steps'"),
        (
            {**MODEL, "fc.bias": torch.zeros(4, dtype=torch.float64)},
            {},
            "'fc.bias': dtype torch.float64, expected torch.float32",
        ),
        ({**MODEL, "fc.weight": torch.zeros(3, 4)}, {}, r"'fc.weight': shape \[3, 4\], expected"),
        (
            {**MODEL, "fc.bias": torch.tensor([0.0, float("nan"), float("inf"), 1.0])},
            {},
            "'fc.bias': 2 of 4 values are NaN or infinite",
        ),
        (
            {**MODEL, "fc.bias": torch.tensor([0.0, -7.5, 1.0, 2.0])},
            {"max_abs": 5.0},
            "'fc.bias': largest magnitude 7.5 exceeds the bound 5",
        ),
        ({**MODEL, "steps": torch.tensor(-9)}, {"max_abs": 5.0}, "'steps': largest magnitude 9"),
        ({**MODEL, "fc.bias": [0.0] * 4}, {}, "expected a torch.Tensor"),
    ],
)
def test_each_problem_is_reported_with_the_key(
    received: dict[str, torch.Tensor], kwargs: dict[str, float], fragment: str
) -> None:
    with pytest.raises(TensorValidationError, match=fragment):
        validate_tensors(received, SPEC, **kwargs)  # type: ignore[arg-type]


def test_partial_updates_pass_when_not_all_keys_are_required() -> None:
    validate_tensors({"fc.bias": torch.ones(4)}, SPEC, require_all=False)
    with pytest.raises(TensorValidationError, match="unexpected"):
        validate_tensors({"nope": torch.ones(4)}, SPEC, require_all=False)


@pytest.mark.parametrize("dtype", [d for d in supported_dtypes() if d.is_floating_point])
def test_non_finite_values_are_caught_in_every_float_dtype(dtype: torch.dtype) -> None:
    bad = torch.tensor([1.0, float("nan")]).to(dtype)
    with pytest.raises(TensorValidationError, match="NaN or infinite"):
        validate_tensors({"x": bad}, {"x": TensorSpec(dtype, (2,))})


@pytest.mark.parametrize("dtype", supported_dtypes())
def test_bound_check_works_for_every_wire_dtype(dtype: torch.dtype) -> None:
    ok = torch.zeros(3, dtype=dtype)
    validate_tensors({"x": ok}, {"x": TensorSpec(dtype, (3,))}, max_abs=0.5)
    if dtype != torch.bool:
        big = torch.full((3,), 100).to(dtype)
        with pytest.raises(TensorValidationError, match="exceeds the bound"):
            validate_tensors({"x": big}, {"x": TensorSpec(dtype, (3,))}, max_abs=0.5)


def test_bad_bound_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="max_abs"):
        validate_tensors({}, {}, max_abs=float("nan"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_large_finite_values_pass_although_their_sum_overflows(dtype: torch.dtype) -> None:
    """The one-pass finiteness check sums the values; an overflowing sum is re-checked exactly."""
    big = torch.full((64,), torch.finfo(dtype).max / 2, dtype=dtype)
    assert not torch.isfinite(big.sum())
    validate_tensors({"x": big}, {"x": TensorSpec(dtype, (64,))})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_value_anywhere_in_a_large_tensor_is_caught(
    dtype: torch.dtype, bad: float
) -> None:
    for position in (0, 4_097, 99_999):
        values = torch.randn(100_000).to(dtype)
        values[position] = bad
        with pytest.raises(TensorValidationError, match="1 of 100000 values are NaN or infinite"):
            validate_tensors({"x": values}, {"x": TensorSpec(dtype, (100_000,))})
