"""Checkpoint files (atomic write, keep-last-N, torn-write leftovers, corruption), round
policy validation and straggler share, projection payload validation, credential store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from crossfed.common.crypto.identity import (
    EnrollmentTokenRecord,
    PrincipalRole,
    StoredCredential,
    create_enrollment_token,
    enroll,
)
from crossfed.common.wire.tensor_codec import encode_tensors
from crossfed.server.checkpoints import CheckpointStore
from crossfed.server.credential_store import SqliteCredentialStore
from crossfed.server.errors import CheckpointError, ConfigurationError, InvalidUpdateError
from crossfed.server.projection_exchange import ProjectionSpec, decode_projections
from crossfed.server.round_policy import RoundPolicy

from tests.support.engine_fixtures import small_state


def test_checkpoints_roundtrip_and_keep_last(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2)
    for r in range(5):
        store.save(r, small_state(r), run_id="x")
    assert store.rounds() == [3, 4]
    loaded = store.load(4)
    expected = small_state(4)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    with pytest.raises(CheckpointError, match="round 1 not found"):
        store.load(1)


def test_checkpoint_leftover_tmp_is_ignored_and_cleaned(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, small_state(1))
    torn = tmp_path / ".global-000002.safetensors.tmp-999"
    torn.write_bytes(b"half a file")  # what a kill -9 during a write leaves behind
    assert CheckpointStore(tmp_path).rounds() == [1]
    assert not torn.exists()


def test_corrupt_checkpoint_is_reported(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, small_state(1))
    path = store.path_of(1)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="corrupt"):
        store.load(1)


def test_checkpoint_write_is_durable_file_mode(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    path = store.save(0, small_state())
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)
    assert not list(tmp_path.glob(".*tmp*"))


def test_round_policy_validation_lists_every_problem() -> None:
    with pytest.raises(ConfigurationError) as err:
        RoundPolicy(total_rounds=0, min_clients=0, fraction=1.5)
    text = str(err.value)
    assert "total_rounds" in text and "min_clients" in text and "fraction" in text


@pytest.mark.parametrize(
    ("received", "selected", "share", "min_clients", "closes"),
    [(3, 4, 0.75, 2, True), (2, 4, 0.75, 2, False), (1, 4, 0.25, 2, False), (4, 4, 1.0, 2, True)],
)
def test_straggler_share(
    received: int, selected: int, share: float, min_clients: int, closes: bool
) -> None:
    policy = RoundPolicy(min_clients=min_clients, straggler_fraction=share)
    assert policy.enough_to_close(received, selected) is closes


def test_projection_payload_validation() -> None:
    spec = ProjectionSpec(num_classes=2, text_dim=3, image_dim=4)
    good = {
        "text_sum": torch.zeros(2, 3),
        "image_sum": torch.zeros(2, 4),
        "text_count": torch.ones(2),
        "image_count": torch.ones(2),
    }
    assert set(decode_projections(encode_tensors(good), spec)) == set(good)
    for mutate, words in (
        (lambda d: d.update(text_sum=torch.zeros(3, 3)), "shape"),
        (lambda d: d.update(image_count=-torch.ones(2)), "negative"),
        (lambda d: d.update(text_sum=torch.full((2, 3), float("inf"))), "non-finite"),
        (lambda d: d.pop("image_sum"), "keys"),
    ):
        bad = dict(good)
        mutate(bad)
        with pytest.raises(InvalidUpdateError, match=words):
            decode_projections(encode_tensors(bad), spec)
    with pytest.raises(InvalidUpdateError, match="safetensors"):
        decode_projections(b"garbage" * 10, spec)


def test_sqlite_credential_store_protocol_and_persistence(tmp_path: Path) -> None:
    path = tmp_path / "cred.db"
    store = SqliteCredentialStore(path)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
    issued = create_enrollment_token(store, ttl_s=60, client_id="c1")
    cred = enroll(store, issued.token.reveal())
    assert cred.client_id == "c1"
    assert store.take_enrollment_token(issued.record.token_hash) is None  # one-time
    store.put_enrollment_token(EnrollmentTokenRecord("h", 1.0, None, None, PrincipalRole.ADMIN))
    store.close()
    again = SqliteCredentialStore(path)
    got = again.get_credential("c1")
    assert got is not None and got.secret == cred.secret and not got.revoked
    assert again.revoke("c1") and not again.revoke("nobody")
    revoked = again.get_credential("c1")
    assert revoked is not None and revoked.revoked
    token = again.take_enrollment_token("h")
    assert token is not None and token.role == PrincipalRole.ADMIN
    again.put_credential(StoredCredential("c2", b"s" * 32, expires_at=5.0))
    c2 = again.get_credential("c2")
    assert c2 is not None and c2.expires_at == 5.0
    again.close()
