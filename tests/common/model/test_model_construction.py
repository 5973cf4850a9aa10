"""A seeded network depends on its seed alone, even while another thread builds networks (the
simulator drives several runs from threads; a run's initial weights once changed with the
machine's load because a neighbour's construction drew from torch's one generator)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from crossfed.common.model import model_construction
from crossfed.common.model.model_construction import model_to_load, seeded_model
from crossfed.common.model.network import CrossModalNet

from tests.support.small_model import small_model_config

CONFIG = small_model_config()


def _same(a: CrossModalNet, b: CrossModalNet) -> bool:
    sa, sb = a.shareable_state_dict(), b.shareable_state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_seed_gives_the_same_weights_and_leaves_the_callers_generator_alone() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = seeded_model(CONFIG, 7)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert _same(first, seeded_model(CONFIG, 7))
    assert not _same(first, seeded_model(CONFIG, 8))


def test_a_network_built_meanwhile_on_another_thread_cannot_shift_a_seeded_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = seeded_model(CONFIG, 3)
    seeded_entered, release_seeded = threading.Event(), threading.Event()
    real = model_construction.CrossModalNet

    def paused_once(config: Any) -> CrossModalNet:
        """The seeded construction stops after seeding, until the other thread has had its
        chance to draw from the generator."""
        if not seeded_entered.is_set():
            seeded_entered.set()
            assert release_seeded.wait(30)
        return real(config)

    monkeypatch.setattr(model_construction, "CrossModalNet", paused_once)
    built: dict[str, CrossModalNet] = {}
    seeded = threading.Thread(target=lambda: built.update(seeded=seeded_model(CONFIG, 3)))
    seeded.start()
    assert seeded_entered.wait(30)
    other_done = threading.Event()
    other = threading.Thread(
        target=lambda: (built.update(other=model_to_load(CONFIG)), other_done.set())
    )
    other.start()
    # two seconds for the other construction to run: unguarded, it draws from the seeded
    # stream meanwhile and the weights below differ; guarded, it waits for the seeded one
    other_done.wait(2.0)
    release_seeded.set()
    seeded.join(30)
    other.join(30)
    assert _same(built["seeded"], expected)
    assert "other" in built
