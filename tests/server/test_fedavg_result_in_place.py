"""StreamingFedAvg.result divides the running sum in place (no second model-sized buffer at
commit): the aggregator is finished afterwards, result() is stable, add() refuses."""

from __future__ import annotations

import pytest
import torch
from crossfed.server.aggregation import StreamingFedAvg


def test_result_is_stable_and_add_after_result_is_refused() -> None:
    glob = {"m.w": torch.zeros(4)}
    agg = StreamingFedAvg(glob, lambda k: k.split(".")[0])
    agg.add({"m.w": torch.full((4,), 2.0)}, {"m": 1.0}, 1)
    agg.add({"m.w": torch.full((4,), 5.0)}, {"m": 2.0}, 2)
    first = agg.result()
    assert torch.allclose(first["m.w"], torch.full((4,), 4.0))  # (2*1 + 5*2) / 3
    assert torch.equal(agg.result()["m.w"], first["m.w"])  # not divided twice
    with pytest.raises(RuntimeError, match="already"):
        agg.add({"m.w": torch.ones(4)}, {"m": 1.0}, 1)
    assert torch.equal(glob["m.w"], torch.zeros(4))  # the input global is untouched
