"""Identities without gRPC: enrollment tokens, credentials, request signatures, replay cache."""

from __future__ import annotations

import logging
import pickle
import stat
from pathlib import Path

import pytest
from crossfed.common.crypto.identity import (
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    AuthenticationError,
    ClientCredential,
    CredentialFileError,
    EnrollmentError,
    InMemoryCredentialStore,
    NonceReplayCache,
    PrincipalRole,
    RequestVerifier,
    create_admin_credential,
    create_enrollment_token,
    enroll,
    hash_token,
    sign_request,
)

METHOD = "/crossfed.v1.Coordinator/Heartbeat"
T0 = 1_700_000_000.0


def _verifier(store: InMemoryCredentialStore, now: float = T0, **kw: object) -> RequestVerifier:
    return RequestVerifier(store, clock=lambda: now, **kw)  # type: ignore[arg-type]


def test_token_is_stored_only_as_hash_and_is_one_time() -> None:
    store = InMemoryCredentialStore()
    issued = create_enrollment_token(store, now=T0)
    token = issued.token.reveal()
    assert issued.record.token_hash == hash_token(token) and token not in repr(store.__dict__)
    cred = enroll(store, token, requested_client_id="hospital-1", now=T0)
    assert cred.client_id == "hospital-1" and cred.role is PrincipalRole.CLIENT
    assert len(cred.secret) == 32
    assert store.get_client_secret("hospital-1") == cred.secret
    with pytest.raises(EnrollmentError, match="unknown or was already used"):
        enroll(store, token, now=T0)


def test_expired_bound_and_bad_tokens() -> None:
    store = InMemoryCredentialStore()
    expiring = create_enrollment_token(store, ttl_s=60, now=T0).token.reveal()
    with pytest.raises(EnrollmentError, match="expired"):
        enroll(store, expiring, now=T0 + 61)
    with pytest.raises(EnrollmentError, match="malformed"):
        enroll(store, "not-a-token", now=T0)
    bound = create_enrollment_token(store, client_id="site-7", now=T0).token.reveal()
    with pytest.raises(EnrollmentError, match="bound to client id 'site-7'"):
        enroll(store, bound, requested_client_id="other", now=T0)
    # the refused attempt did not burn the token
    assert enroll(store, bound, now=T0).client_id == "site-7"
    generated = enroll(store, create_enrollment_token(store).token.reveal())
    assert generated.client_id.startswith("client-")
    with pytest.raises(EnrollmentError, match="ttl must be a positive number"):
        create_enrollment_token(store, ttl_s=0)


def test_unbound_token_cannot_take_over_enrolled_id_but_bound_token_rekeys() -> None:
    store = InMemoryCredentialStore()
    first = enroll(store, create_enrollment_token(store).token.reveal(), "c1")
    token = create_enrollment_token(store).token.reveal()
    with pytest.raises(EnrollmentError, match="already enrolled"):
        enroll(store, token, "c1")
    with pytest.raises(EnrollmentError, match="invalid client id"):
        enroll(store, token, "bad id!")
    rekeyed = enroll(store, create_enrollment_token(store, client_id="c1").token.reveal())
    assert rekeyed.secret != first.secret and store.get_client_secret("c1") == rekeyed.secret


def test_signature_accepts_genuine_and_rejects_forged_stale_replayed() -> None:
    store = InMemoryCredentialStore()
    cred = enroll(store, create_enrollment_token(store).token.reveal(), "c1")
    verifier = _verifier(store)
    md = dict(sign_request(cred, METHOD, now=T0))
    assert verifier.verify(METHOD, md).client_id == "c1"
    with pytest.raises(AuthenticationError, match="replayed"):
        verifier.verify(METHOD, md)
    forged = dict(sign_request(ClientCredential("c1", b"x" * 32), METHOD, now=T0))
    with pytest.raises(AuthenticationError, match="bad signature"):
        verifier.verify(METHOD, forged)
    other_method = dict(sign_request(cred, METHOD, now=T0))
    with pytest.raises(AuthenticationError, match="bad signature"):
        verifier.verify("/crossfed.v1.Admin/StopRun", other_method)
    unknown = dict(sign_request(ClientCredential("ghost", b"k" * 32), METHOD, now=T0))
    with pytest.raises(AuthenticationError, match="unknown client"):
        verifier.verify(METHOD, unknown)
    stale = dict(sign_request(cred, METHOD, now=T0 - 600))
    with pytest.raises(AuthenticationError, match="off the server clock"):
        verifier.verify(METHOD, stale)
    future = dict(sign_request(cred, METHOD, now=T0 + 600))
    with pytest.raises(AuthenticationError, match="off the server clock"):
        verifier.verify(METHOD, future)
    with pytest.raises(AuthenticationError, match="missing credentials"):
        verifier.verify(METHOD, {})
    tampered = dict(sign_request(cred, METHOD, now=T0))
    tampered[HEADER_TIMESTAMP] = str(int(T0 * 1000) + 1)
    with pytest.raises(AuthenticationError, match="bad signature"):
        verifier.verify(METHOD, tampered)
    junk = dict(sign_request(cred, METHOD, now=T0))
    junk[HEADER_NONCE] = "zz"
    with pytest.raises(AuthenticationError, match="malformed"):
        verifier.verify(METHOD, junk)


def test_revoked_and_expired_credentials() -> None:
    store = InMemoryCredentialStore()
    cred = enroll(store, create_enrollment_token(store).token.reveal(), "c1", credential_ttl_s=10)
    # the enrollment used wall-clock time; verify just inside and after its expiry
    created = store.get_credential("c1")
    assert created is not None and created.expires_at is not None
    late = created.expires_at + 1
    with pytest.raises(AuthenticationError, match="has expired"):
        _verifier(store, now=late).verify(METHOD, dict(sign_request(cred, METHOD, now=late)))
    assert store.revoke("c1") and store.is_revoked("c1") and not store.revoke("nobody")
    ok_time = created.created_at + 1
    with pytest.raises(AuthenticationError, match="revoked"):
        _verifier(store, now=ok_time).verify(METHOD, dict(sign_request(cred, METHOD, now=ok_time)))


def test_replay_cache_is_bounded_and_never_lets_an_evicted_nonce_through() -> None:
    store = InMemoryCredentialStore()
    cred = enroll(store, create_enrollment_token(store).token.reveal(), "c1")
    cache = NonceReplayCache(max_entries=3)
    verifier = _verifier(store, replay_cache=cache)
    signed = [dict(sign_request(cred, METHOD, now=T0 - 5 + i)) for i in range(5)]
    for md in signed:
        verifier.verify(METHOD, md)
    assert len(cache) == 3
    for md in signed:  # evicted ones are refused by the floor, kept ones as replays
        with pytest.raises(AuthenticationError):
            verifier.verify(METHOD, md)
    # entries leave the cache once their timestamp is outside the skew window
    later = _verifier(store, now=T0 + 1000, replay_cache=cache)
    later.verify(METHOD, dict(sign_request(cred, METHOD, now=T0 + 1000)))
    assert len(cache) == 1


def test_secrets_never_in_repr_str_logs_or_pickle(caplog: pytest.LogCaptureFixture) -> None:
    store = InMemoryCredentialStore()
    issued = create_enrollment_token(store)
    token = issued.token.reveal()
    cred = enroll(store, token, "c1")
    admin = create_admin_credential(store)
    stored = store.get_credential("c1")
    secret_hex = cred.secret.hex()
    log = logging.getLogger("crossfed.test")
    with caplog.at_level(logging.INFO, logger="crossfed.test"):
        log.info("issued %s %r", issued, issued.token)
        log.info("cred %s / %r / %s / %r", cred, cred, admin, stored)
        log.info(f"f-string {issued.token} {cred}")
    text = caplog.text + repr(issued) + str(cred) + repr(admin) + repr(stored)
    assert token not in text and secret_hex not in text and repr(cred.secret) not in text
    assert admin.secret.hex() not in text and "<redacted>" in text
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(issued.token)


def test_credential_file_round_trip_mode_and_errors(tmp_path: Path) -> None:
    store = InMemoryCredentialStore()
    admin = create_admin_credential(store, "ops")
    path = tmp_path / "cred.json"
    admin.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = ClientCredential.load(path)
    assert loaded == admin and loaded.role is PrincipalRole.ADMIN
    path.chmod(0o644)
    with pytest.raises(CredentialFileError, match="chmod 600"):
        ClientCredential.load(path)
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    bad.chmod(0o600)
    with pytest.raises(CredentialFileError, match="cannot read credential file"):
        ClientCredential.load(bad)
    md = dict(sign_request(admin, METHOD))
    assert admin.secret.hex() not in str(md) and len(md[HEADER_SIGNATURE]) == 64
