"""Fuzz a TLS + HMAC server (the deployment mode) as an attacker without a credential: every
Coordinator and Admin method, random request bytes, and forged identity metadata (unknown
and real client ids, well-formed but wrong signatures, edge timestamps, garbage headers).
Everything but Enroll must be refused with UNAUTHENTICATED (Enroll: a proper refusal of the
bad token), nothing leaks a trace, and the state DB, the credential DB and the checkpoints
stay bit-identical (no event, no client, no credential created)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from crossfed.common.config import ServerConfig
from crossfed.common.crypto.grpc_credentials import channel_credentials
from crossfed.common.crypto.identity import create_enrollment_token
from crossfed.server import server_app
from crossfed.server.server_app import CoordinatorServer, ServerOptions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.certificates import make_certs
from tests.support.reliability.reliability_harness import (
    checkpoint_digests,
    dump_db,
    record_result,
)
from tests.support.reliability.rpc_fuzzing import (
    ADMIN,
    ADMIN_METHODS,
    COORDINATOR,
    COORDINATOR_METHODS,
    FuzzTally,
    RawCaller,
    blobs,
    texts,
)
from tests.support.small_model import SMALL_MODEL
from tests.support.standin_model import standin_model

FAST_CASES = 150
SLOW_CASES = 2500

hexes = st.text(alphabet="0123456789abcdef", min_size=0, max_size=70)
header_value = st.one_of(texts.filter(lambda s: s.isascii() and s.isprintable()), hexes)


@st.composite
def forged_metadata(draw: st.DrawFn, real_client: str) -> tuple[tuple[str, str], ...]:
    """Identity headers an attacker could send (never a valid signature)."""
    now_ms = int(time.time() * 1000)
    client = draw(st.sampled_from([real_client, "admin", "nobody", ""]))
    timestamp = draw(
        st.one_of(
            st.just(str(now_ms)),
            st.sampled_from(["0", "9" * 16, "9" * 17, "-1", "1e3", " 1", "", "１２３"]),
            st.integers(0, 2**64).map(str),
        )
    )
    nonce = draw(st.one_of(st.just("0" * 32), hexes))
    signature = draw(st.one_of(st.just("f" * 64), hexes))
    md = [
        ("x-crossfed-client-id", client),
        ("x-crossfed-timestamp-ms", timestamp),
        ("x-crossfed-nonce", nonce),
        ("x-crossfed-signature", signature),
    ]
    keep = draw(st.lists(st.booleans(), min_size=4, max_size=4))
    out = [(k, v) for (k, v), on in zip(md, keep, strict=True) if on and v]
    out += draw(
        st.lists(
            st.tuples(st.sampled_from(["x-crossfed-role", "x-admin"]), header_value.filter(bool)),
            max_size=2,
        )
    )
    return tuple((k, v) for k, v in out if v.isascii() and v.isprintable() and v.strip() == v)


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cases: int, name: str) -> None:
    certs = tmp_path / "certs"
    make_certs(certs)
    monkeypatch.setattr(server_app, "build_initial_model", standin_model)
    state_dir = tmp_path / "state"
    cfg = ServerConfig.model_validate(
        {
            "listen": "127.0.0.1:0",
            "state_dir": str(state_dir),
            "model": SMALL_MODEL,
            "rounds": {"rounds": 2, "min_clients": 1},
            "tls": {"cert_dir": str(certs)},
        }
    )
    server = CoordinatorServer.create(cfg, ServerOptions(tick_interval_s=0.05))
    port = server.start()
    assert server.credential_store is not None
    # a real, enrolled-looking client exists (its id is known to the attacker, not its secret)
    create_enrollment_token(server.credential_store, ttl_s=600, client_id="victim")
    tally = FuzzTally()
    dbs = ("state.db", "credentials.db")

    def snapshot() -> tuple[object, ...]:
        return (
            checkpoint_digests(state_dir),
            *(dump_db(state_dir / db, drop={"sqlite_sequence": ("*",)}) for db in dbs),
        )

    before = snapshot()
    methods = [(COORDINATOR + m, k) for m, k in COORDINATOR_METHODS]
    methods += [(ADMIN + m, k) for m, k in ADMIN_METHODS]
    try:
        with grpc.secure_channel(f"localhost:{port}", channel_credentials(certs)) as channel:
            caller = RawCaller(channel, tally)

            @settings(
                max_examples=cases,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(st.sampled_from(methods), st.lists(blobs, max_size=3), forged_metadata("victim"))
            def attack(method: tuple[str, str], payloads: list[bytes], md: tuple) -> None:
                name_, kind = method
                first = payloads[0] if payloads else b""
                if kind == "unary":
                    code, _ = caller.unary(name_, first, md)
                elif kind == "server_stream":
                    code, _ = caller.server_stream(name_, first, md)
                else:
                    code, _ = caller.client_stream(name_, payloads, md)
                if sum(len(k) + len(v) for k, v in md) > 8000 and (
                    code == grpc.StatusCode.RESOURCE_EXHAUSTED
                ):
                    return  # beyond gRPC's default 8 KiB metadata limit: the transport refuses
                if name_.endswith("/Enroll"):
                    assert code in (
                        grpc.StatusCode.PERMISSION_DENIED,
                        grpc.StatusCode.INTERNAL,
                        grpc.StatusCode.INVALID_ARGUMENT,
                    ), code
                else:
                    assert code == grpc.StatusCode.UNAUTHENTICATED, (name_, code)

            attack()
    finally:
        server.stop()
    assert snapshot() == before, "an unauthenticated caller changed server state"
    record_result(
        name,
        cases=tally.total,
        per_rpc=dict(tally.cases),
        statuses=dict(tally.statuses),
        improper=0,
    )


def test_fuzz_unauthenticated_tls_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _run(tmp_path, monkeypatch, FAST_CASES, "fuzz_unauthenticated_fast")


@pytest.mark.slow
def test_fuzz_unauthenticated_tls_server_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run(tmp_path, monkeypatch, SLOW_CASES, "fuzz_unauthenticated_long")
