"""Module-aware streaming FedAvg (eq. 15) checked against a hand computation."""

from __future__ import annotations

import pytest
import torch
from crossfed.server.aggregation import StreamingFedAvg, module_weights_of
from crossfed.server.errors import InvalidUpdateError

from tests.support.engine_fixtures import module_of, small_state

MODULES = frozenset({"fusion", "mapper"})


def _const_state(value: float) -> dict[str, torch.Tensor]:
    base = small_state()
    out = {k: torch.full_like(v, value) for k, v in base.items() if v.is_floating_point()}
    out["fusion.num_batches_tracked"] = torch.tensor(1000 + int(value), dtype=torch.int64)
    return out


def test_hand_computed_module_aware_average() -> None:
    glob = small_state()
    agg = StreamingFedAvg(glob, module_of)
    # client A: paired, 30 samples, trained everything
    agg.add(_const_state(1.0), module_weights_of(30, {}, MODULES), 30)
    # client B: image-only, 10 samples; its mapper copy is untouched (module_samples omits it)
    agg.add(_const_state(5.0), module_weights_of(10, {"fusion": 10}, MODULES), 10)
    # client C: 20 samples, of which 20 trained fusion and 4 (paired) trained the mapper
    agg.add(_const_state(2.0), module_weights_of(20, {"fusion": 20, "mapper": 4}, MODULES), 20)
    out = agg.result()
    fusion = (30 * 1.0 + 10 * 5.0 + 20 * 2.0) / 60  # = 2.0
    mapper = (30 * 1.0 + 4 * 2.0) / 34  # B's 5.0 must not dilute it
    assert torch.allclose(out["fusion.weight"], torch.full((4, 3), fusion))
    assert torch.allclose(out["fusion.bias"], torch.full((4,), fusion))
    assert torch.allclose(out["mapper.weight"], torch.full((3, 3), mapper))
    # integer buffers keep the global value, whatever the clients sent
    assert torch.equal(out["fusion.num_batches_tracked"], glob["fusion.num_batches_tracked"])
    assert agg.num_updates == 3 and agg.total_samples == 60


def test_untrained_module_keeps_previous_global_value() -> None:
    glob = small_state(3)
    agg = StreamingFedAvg(glob, module_of)
    agg.add(_const_state(4.0), module_weights_of(8, {"fusion": 8}, MODULES), 8)
    out = agg.result()
    assert torch.equal(out["mapper.weight"], glob["mapper.weight"])
    assert torch.allclose(out["fusion.weight"], torch.full((4, 3), 4.0))


def test_matches_dense_weighted_mean_on_random_updates() -> None:
    glob = small_state()
    updates = [small_state(s) for s in range(1, 6)]
    samples = [3, 17, 5, 11, 2]
    agg = StreamingFedAvg(glob, module_of)
    for upd, n in zip(updates, samples, strict=True):
        agg.add(upd, module_weights_of(n, {}, MODULES), n)
    out = agg.result()
    total = sum(samples)
    for key in ("fusion.weight", "mapper.weight"):
        expected = sum(n / total * u[key].double() for u, n in zip(updates, samples, strict=True))
        assert torch.allclose(out[key].double(), expected, atol=1e-6)
        assert out[key].dtype == glob[key].dtype


def test_half_precision_params_accumulate_in_float32() -> None:
    glob = {"m.w": torch.zeros(1000, dtype=torch.float16)}
    agg = StreamingFedAvg(glob, module_of)
    for _ in range(300):
        agg.add({"m.w": torch.full((1000,), 0.1, dtype=torch.float16)}, {"m": 1.0}, 1)
    out = agg.result()["m.w"]
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), torch.full((1000,), 0.1), atol=1e-3)


def test_module_weights_validation() -> None:
    with pytest.raises(InvalidUpdateError, match="num_samples must be > 0"):
        module_weights_of(0, {}, MODULES)
    with pytest.raises(InvalidUpdateError, match="exceed"):
        module_weights_of(5, {"mapper": 6}, MODULES)
    assert module_weights_of(5, {"mapper": 2}, MODULES) == {"mapper": 2.0, "fusion": 0.0}
