"""Registration refuses a client that does not fit the federation (class list, labels,
encoder weights) with a message naming the difference, before it trains; the encoders the
first clients declare are pinned in the state store and survive a restart."""

from __future__ import annotations

from pathlib import Path

import pytest
from crossfed.common.model.encoder_identity import EncoderIdentity
from crossfed.server.errors import FederationMismatchError, InvalidUpdateError
from crossfed.server.federation_contract import ClientFacts, FederationContract
from crossfed.server.round_engine import RoundEngine
from crossfed.server.state.base import StateStore
from crossfed.server.state.memory import InMemoryStateStore
from crossfed.server.state.sqlite import SqliteStateStore
from crossfed.v1 import coordinator_pb2

from tests.support.engine_fixtures import BOTH, FakeClock, make_engine

CLASSES = ("bird", "cat", "dog")
MINILM = EncoderIdentity("minilm", "hf-text:all-MiniLM-L6-v2:aaaa")
CNN = EncoderIdentity("cnn", "cnn:v2:pretrained:bbbb:dim256", 32)


def _engine(tmp_path: Path, store: StateStore | None = None) -> RoundEngine:
    store = store or InMemoryStateStore()
    engine = make_engine(tmp_path, FakeClock(), store=store)
    engine.contract = FederationContract(CLASSES, store)
    return engine


def test_a_different_class_list_is_refused_naming_the_difference(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    with pytest.raises(FederationMismatchError, match=r"lacks 'dog'.*has extra 'fish'"):
        engine.register("a", BOTH, 10, facts=ClientFacts(class_names=("bird", "cat", "fish")))
    with pytest.raises(FederationMismatchError, match="orders them differently"):
        engine.register("a", BOTH, 10, facts=ClientFacts(class_names=("cat", "bird", "dog")))
    assert engine.clients() == []  # nothing registered
    engine.register("a", BOTH, 10, facts=ClientFacts(class_names=CLASSES))
    assert [c.client_id for c in engine.clients()] == ["a"]


def test_labels_must_be_classes_of_the_federation(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    with pytest.raises(FederationMismatchError, match="'zebra'.*--classes"):
        engine.register("a", BOTH, 10, facts=ClientFacts(label_names=("dog", "zebra")))
    # names and class indices written as digits both fit
    engine.register("a", BOTH, 10, facts=ClientFacts(label_names=("dog", "0", "2")))
    with pytest.raises(FederationMismatchError, match="'3'"):
        engine.register("b", BOTH, 10, facts=ClientFacts(label_names=("3",)))


def test_a_server_left_on_the_builtin_classes_refuses_labels_of_a_clients_own(
    tmp_path: Path,
) -> None:
    store = InMemoryStateStore()
    engine = make_engine(tmp_path, FakeClock(), store=store)
    engine.contract = FederationContract(CLASSES, store, configured=False)
    with pytest.raises(FederationMismatchError, match="built-in dataset's classes.*--classes"):
        engine.register("a", BOTH, 10, facts=ClientFacts(label_names=("0", "1")))
    engine.register("b", BOTH, 10, facts=ClientFacts(class_names=CLASSES))  # its own list fits


def test_encoders_are_pinned_by_the_first_client_and_survive_a_restart(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "state.db")
    engine = _engine(tmp_path, store)
    engine.register("a", BOTH, 10, facts=ClientFacts(text_encoder=MINILM))
    engine.register("b", BOTH, 10, facts=ClientFacts(text_encoder=MINILM, image_encoder=CNN))
    assert engine.contract is not None and engine.contract.encoder("image") == CNN
    store.close()

    store = SqliteStateStore(tmp_path / "state.db")
    restarted = _engine(tmp_path, store)
    other = EncoderIdentity("/models/clip", "hf-image:clip:cccc:size224:norm1", 32)
    with pytest.raises(FederationMismatchError, match=r"hf-image:clip.*cnn:v2:pretrained"):
        restarted.register("c", BOTH, 10, facts=ClientFacts(image_encoder=other))
    moved = EncoderIdentity("/elsewhere/cnn", CNN.identity, CNN.image_size)
    restarted.register("c", BOTH, 10, facts=ClientFacts(image_encoder=moved))  # same weights
    smaller = EncoderIdentity("cnn", CNN.identity, 16)  # other preprocessing: other features
    with pytest.raises(FederationMismatchError, match="at 16px"):
        restarted.register("d", BOTH, 10, facts=ClientFacts(image_encoder=smaller))
    store.close()


def test_oversized_declarations_are_invalid_arguments() -> None:
    request = coordinator_pb2.RegisterRequest(label_names=["x" * 300])
    with pytest.raises(InvalidUpdateError, match="over 256"):
        ClientFacts.from_request(request)
    request = coordinator_pb2.RegisterRequest()
    request.image_encoder.spec = "cnn"  # a spec without an identity
    with pytest.raises(InvalidUpdateError, match="encoder"):
        ClientFacts.from_request(request)
