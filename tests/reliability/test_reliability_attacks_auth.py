"""Hostile callers against authentication: a signed request replayed after a server
restart, a signed request's metadata reused with another body, an enrollment token for the
operator's id (`admin`), and under mTLS one client's certificate carrying another client's
credential. Each goes through the real TLS server (and CLI where an operator would)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from crossfed.common.crypto.rpc_auth import authenticated_channel
from crossfed.v1 import admin_pb2, coordinator_pb2, coordinator_pb2_grpc
from typer.testing import CliRunner

from crossfed.cli import app
from tests.support.reliability.attack_harness import (
    HeldCall,
    MetadataRecorder,
    attack_server,
    record_attack,
    rpc_error,
    status,
)

REGISTER = "/crossfed.v1.Coordinator/Register"


def _register_request(num_samples: int) -> coordinator_pb2.RegisterRequest:
    return coordinator_pb2.RegisterRequest(modality=1, num_samples=num_samples)  # type: ignore[arg-type]


def test_a_signed_request_is_not_accepted_again_after_a_restart(tmp_path: Path) -> None:
    with attack_server(tmp_path) as srv:
        credential = srv.enroll("victim")
        recorder = MetadataRecorder()
        raw = srv.channel()
        signed = authenticated_channel(grpc.intercept_channel(raw, recorder), credential)
        request = _register_request(7)
        coordinator_pb2_grpc.CoordinatorStub(signed).Register(request, timeout=10)
        captured = recorder.metadata  # what an eavesdropper of the call would hold
        srv.restart()
        with srv.channel() as channel:  # the replay, within the clock window
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            replay = rpc_error(lambda: stub.Register(request, metadata=captured, timeout=10))
        raw.close()
    assert replay.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert "already used" in (replay.details() or "")  # type: ignore[attr-defined]
    record_attack(
        "replay_after_restart",
        "a signed Register is replayed, byte for byte, after the server restarted",
        "refused: accepted nonces are journaled in the state dir and reloaded",
        status(replay),
    )


def test_a_signature_does_not_authorise_another_body(tmp_path: Path) -> None:
    with attack_server(tmp_path) as srv:
        credential = srv.enroll("victim")
        recorder = MetadataRecorder(hold=True)  # signed, never sent: its nonce is fresh
        raw = srv.channel()
        signed = authenticated_channel(grpc.intercept_channel(raw, recorder), credential)
        with pytest.raises(HeldCall):
            coordinator_pb2_grpc.CoordinatorStub(signed).Register(_register_request(7), timeout=10)
        with srv.channel() as channel:
            plain = coordinator_pb2_grpc.CoordinatorStub(channel)
            forged = rpc_error(
                lambda: plain.Register(
                    _register_request(10**6), metadata=recorder.metadata, timeout=10
                )
            )
        raw.close()
        clients = {c.client_id for c in srv.engine.clients()}
    assert forged.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert "body" in (forged.details() or "")  # type: ignore[attr-defined]
    assert "victim" not in clients
    record_attack(
        "signature_with_another_body",
        "the metadata signed for Register(num_samples=7) (never sent) comes with "
        "Register(num_samples=1e6)",
        "refused: the signature covers the SHA-256 of the request body",
        status(forged),
    )


def test_a_token_for_the_admin_id_cannot_lock_the_operator_out(tmp_path: Path) -> None:
    with attack_server(tmp_path) as srv:
        with srv.admin() as admin:
            over_rpc = rpc_error(
                lambda: admin.CreateEnrollmentToken(
                    admin_pb2.CreateEnrollmentTokenRequest(ttl_s=60, client_id="admin"),
                    timeout=10,
                )
            )
        cli = CliRunner().invoke(
            app, ["server", "token", "--state-dir", str(srv.state_dir), "--client-id", "admin"]
        )
        with srv.admin() as admin:  # the operator still operates
            alive = admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
    assert over_rpc.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "is an enrolled admin" in (over_rpc.details() or "")  # type: ignore[attr-defined]
    assert cli.exit_code == 2 and "is an enrolled admin" in cli.output
    assert "Traceback" not in cli.output and len(cli.output.strip().splitlines()) == 1
    assert alive.run_id
    record_attack(
        "token_for_admin_id",
        "CreateEnrollmentToken(client_id='admin') and `crossfed server token --client-id "
        "admin`, then enroll with it",
        "refused (a token never takes over a principal of another role); the operator keeps "
        "control",
        f"Admin RPC {status(over_rpc)}; CLI exit {cli.exit_code}: {cli.output.strip()}",
    )


def test_a_token_made_before_the_admin_existed_cannot_be_redeemed_as_admin(tmp_path: Path) -> None:
    state = tmp_path / "state"
    early = CliRunner().invoke(
        app, ["server", "token", "--state-dir", str(state), "--client-id", "admin"]
    )
    assert early.exit_code == 0  # no admin principal yet: nothing to protect
    token = early.output.strip()
    with attack_server(tmp_path) as srv:  # first start creates the operator's credential
        with srv.channel() as channel:
            refused = rpc_error(
                lambda: coordinator_pb2_grpc.CoordinatorStub(channel).Enroll(
                    coordinator_pb2.EnrollRequest(enrollment_token=token), timeout=10
                )
            )
        with srv.admin() as admin:
            assert admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10).run_id
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    record_attack(
        "early_token_for_admin_id",
        "a token for 'admin' made with `crossfed server token` before the first start is "
        "redeemed once the operator's credential exists",
        "refused at Enroll; the admin credential keeps working",
        status(refused),
    )


def test_mtls_certificate_is_bound_to_the_signing_client(tmp_path: Path) -> None:
    mtls = {"tls": {"cert_dir": str(tmp_path / "certs"), "mtls": True}}
    with attack_server(tmp_path, mtls, client_certs=("alice", "bob"), admin_cert="ops") as srv:
        alice = srv.enroll("alice", cert="alice")
        srv.enroll("bob", cert="bob")
        with srv.channel("alice") as own, srv.channel("bob") as other:
            ok = coordinator_pb2_grpc.CoordinatorStub(authenticated_channel(own, alice))
            assert ok.Register(_register_request(5), timeout=10).client_id == "alice"
            stolen = coordinator_pb2_grpc.CoordinatorStub(authenticated_channel(other, alice))
            swapped = rpc_error(lambda: stolen.Register(_register_request(5), timeout=10))
            enroll_as = rpc_error(
                lambda: coordinator_pb2_grpc.CoordinatorStub(other).Enroll(
                    coordinator_pb2.EnrollRequest(
                        enrollment_token=srv.token("carol"), requested_client_id="carol"
                    ),
                    timeout=10,
                )
            )
    assert swapped.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "belongs to client 'bob'" in (swapped.details() or "")  # type: ignore[attr-defined]
    assert enroll_as.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    record_attack(
        "mtls_certificate_of_another_client",
        "under mTLS, bob's TLS certificate carries alice's (stolen) credential; bob's "
        "certificate enrolls as carol",
        "refused: the certificate's name must be the signing (or enrolling) client id",
        f"{status(swapped)}; Enroll: {status(enroll_as)}",
    )
