"""Stable Diffusion runs at the engine: registration decides each client's recovery from the
checkpoint digest it declares (refused with one line when the run cannot admit it), an update
may leave out the SD deltas it did not train, and a client registered without the checkpoint
cannot weigh in on them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from crossfed.server.checkpoints import CheckpointStore
from crossfed.server.errors import InvalidUpdateError, ModelMismatchError
from crossfed.server.projection_exchange import ProjectionSpec
from crossfed.server.round_engine import RoundEngine
from crossfed.server.round_policy import RoundPolicy
from crossfed.server.round_uploads import UploadTicket
from crossfed.server.sd_admission import SDRequirement, client_recovery
from crossfed.server.state.memory import InMemoryStateStore

from tests.support.engine_fixtures import BOTH, TEXT_ONLY, FakeClock, module_of, small_state

DIGEST = "ab" * 32
SD_KEY = "sd_recovery.mid_block.attn2.to_k.weight"


def _engine(tmp_path: Path, refuse: bool) -> RoundEngine:
    state = {**small_state(), SD_KEY: torch.zeros(4, 2)}
    return RoundEngine(
        InMemoryStateStore(),
        CheckpointStore(tmp_path / "ckpt", keep_last=2),
        state,
        module_of,
        RoundPolicy(total_rounds=1, min_clients=2, round_deadline_s=60.0),
        projection_spec=ProjectionSpec(num_classes=2, text_dim=3, image_dim=2),
        sd_requirement=SDRequirement(DIGEST, refuse_without=refuse),
        clock=FakeClock(),
        commit_inline=True,
    )


def test_registration_refuses_clients_the_run_cannot_admit(tmp_path: Path) -> None:
    engine = _engine(tmp_path, refuse=True)
    with pytest.raises(ModelMismatchError, match="this client has none") as none:
        engine.register("plain", TEXT_ONLY, 10)
    assert "\n" not in str(none.value) and "--sd-checkpoint" in str(none.value)
    with pytest.raises(ModelMismatchError, match="client's checkpoint is cdcdcdcdcdcd"):
        engine.register("other", TEXT_ONLY, 10, sd_checkpoint_digest="cd" * 32)
    engine.register("sd", TEXT_ONLY, 10, sd_checkpoint_digest=DIGEST)
    assert [c.client_id for c in engine.clients()] == ["sd"]
    refused = [e.client_id for e in engine.store.events_after(0) if e.kind == "client_refused"]
    assert refused == ["plain", "other"]
    assert client_recovery(None, DIGEST) == "feature"  # a feature run ignores checkpoints


def test_mixed_run_averages_sd_deltas_over_the_clients_that_trained_them(tmp_path: Path) -> None:
    engine = _engine(tmp_path, refuse=False)
    engine.register("sd", BOTH, 10, sd_checkpoint_digest=DIGEST)
    engine.register("edge", TEXT_ONLY, 10)  # admitted: feature recovery
    engine.tick()
    opened = engine.open_round
    assert opened is not None and sorted(opened.selected) == ["edge", "sd"]
    trained = {m: 10 for m in ("fusion", "mapper", "sd_recovery")}
    # a feature client may not weigh in on the SD deltas ...
    with pytest.raises(InvalidUpdateError, match="registered without the Stable Diffusion"):
        engine.uploads.begin("edge", 1, "e0", 10, trained)
    # ... and uploads without them; leaving out a module it trained is refused
    edge = engine.uploads.begin("edge", 1, "e1", 10, {"fusion": 10, "mapper": 10})
    assert isinstance(edge, UploadTicket)
    partial = {k: v for k, v in small_state(1).items() if not k.startswith("mapper")}
    with pytest.raises(InvalidUpdateError, match="missing tensor 'mapper.weight'"):
        engine.uploads.complete(edge, partial)
    edge_state = {k: v for k, v in small_state(1).items()}
    assert engine.uploads.complete(edge, edge_state).accepted
    sd = engine.uploads.begin("sd", 1, "s1", 10, trained)
    assert isinstance(sd, UploadTicket)
    with pytest.raises(InvalidUpdateError, match="missing tensor"):
        engine.uploads.complete(sd, small_state(2))  # trained the SD deltas: must send them
    assert engine.uploads.complete(sd, {**small_state(2), SD_KEY: torch.ones(4, 2)}).accepted
    engine.tick()
    new_global = engine.global_state
    assert torch.equal(new_global[SD_KEY], torch.ones(4, 2))  # not diluted by "edge"
    assert torch.allclose(
        new_global["fusion.weight"],
        (small_state(1)["fusion.weight"] + small_state(2)["fusion.weight"]) / 2,
    )
