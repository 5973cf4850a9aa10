"""The server writes a model bundle beside every committed checkpoint (pruned with it), with
the prototypes published by then, and a disk that refuses the bundle does not undo the
commit: export builds the bundle from the checkpoint instead."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from crossfed.common.model.encoder_identity import EncoderIdentity
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.wire.tensor_codec import decode_metadata, decode_tensors
from crossfed.server.federation_contract import ClientFacts, FederationContract
from crossfed.server.model_bundles import BundleStore
from crossfed.server.round_engine import RoundEngine
from crossfed.server.round_uploads import UploadTicket
from crossfed.server.state.memory import InMemoryStateStore

from tests.support.engine_fixtures import BOTH, FakeClock, make_engine, small_state

CLASSES = ("a", "b")
TEXT = EncoderIdentity("minilm", "hf-text:m:1")


def _engine(tmp_path: Path) -> RoundEngine:
    store = InMemoryStateStore()
    engine = make_engine(tmp_path, FakeClock(), store=store, total_rounds=3)
    engine.contract = FederationContract(CLASSES, store)
    config = ModelConfig(num_classes=2, text_dim=3, image_dim=2)
    engine.commits.bundles = BundleStore(
        engine.checkpoints, config, engine.contract, 1e-5, store.get_run
    )  # type: ignore[arg-type]
    for cid in ("c1", "c2"):
        engine.register(cid, BOTH, 10, facts=ClientFacts(text_encoder=TEXT))
    return engine


def _round(engine: RoundEngine, round_no: int) -> None:
    engine.heartbeat("c1")
    for cid in ("c1", "c2"):
        ticket = engine.uploads.begin(cid, round_no, f"{cid}-{round_no}", 10, {})
        assert isinstance(ticket, UploadTicket)
        engine.uploads.complete(ticket, small_state(round_no))


def test_a_bundle_per_kept_checkpoint(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    assert engine.bundles is not None
    for round_no in (1, 2, 3):
        _round(engine, round_no)
    assert engine.run.state == "completed"
    kept = engine.checkpoints.rounds()
    assert kept == [2, 3]  # keep_last=2
    files = sorted(p.name for p in engine.checkpoints.directory.glob("bundle-*"))
    assert files == ["bundle-000002.safetensors", "bundle-000003.safetensors"]
    data = engine.bundles.read(3)
    meta = decode_metadata(data)
    assert meta["round"] == "3" and meta["run_id"] == engine.run.run_id
    assert '"hf-text:m:1"' in meta["encoders"] and meta["class_names"] == '["a", "b"]'
    tensors = decode_tensors(data)
    checkpoint = engine.checkpoints.load(3)
    assert all(torch.equal(tensors[f"model/{k}"], v) for k, v in checkpoint.items())
    engine.bundles.path_of(3).unlink()  # e.g. a state directory of an older server
    rebuilt = engine.bundles.read(3)  # built again from the checkpoint
    assert decode_tensors(rebuilt).keys() == tensors.keys()
    assert {**decode_metadata(rebuilt), "created_unix_s": ""} == {**meta, "created_unix_s": ""}


def test_a_refused_bundle_write_keeps_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(tmp_path)
    assert engine.bundles is not None

    def disk_full(*args: object) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine.bundles, "write", disk_full)
    _round(engine, 1)
    assert engine.run.last_committed_round == 1
    kinds = [e.kind for e in engine.store.events_after(0)]
    assert "round_committed" in kinds and "bundle_failed" in kinds
    monkeypatch.undo()
    assert decode_metadata(engine.bundles.read(1))["round"] == "1"  # export still works


def test_each_commit_is_one_info_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    engine = _engine(tmp_path)
    with caplog.at_level(logging.INFO, logger="crossfed.server.commit_pipeline"):
        _round(engine, 1)
    lines = [r.getMessage() for r in caplog.records if "committed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("round 1 committed: 2 upload(s), 20 samples")
    assert "epsilon 0.00 so far" in lines[0]
