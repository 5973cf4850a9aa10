"""Hostile clients against the projection exchange's privacy (eq. 16): a client that adds no
noise (and says epsilon 0), one that claims the mandated noise but sends exact class means,
and one that would keep releasing past the budget. The server mandates the noise, refuses
what lacks it, and counts every client's epsilon itself; its budget ends a client's releases
while its training goes on."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import torch
from crossfed.common.config import ServerPrivacyConfig
from crossfed.common.privacy.privacy_accountant import PrivacyAccountant
from crossfed.common.wire.tensor_codec import encode_tensors
from crossfed.v1 import admin_pb2, common_pb2, coordinator_pb2

from tests.support.reliability.attack_harness import (
    AttackServer,
    attack_server,
    record_attack,
    rpc_error,
    status,
    wait_for,
    wait_train,
)
from tests.support.reliability.reliability_harness import LightClient, projection_payload

SIGMA = ServerPrivacyConfig().noise_multiplier  # the server's default mandate


def _exact_means() -> bytes:
    """What a client without DP releases: its exact class means (norm 1), presence counts."""
    g = torch.Generator().manual_seed(7)
    return encode_tensors(
        {
            "text_sum": torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=1),
            "image_sum": torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1),
            "text_count": torch.ones(3),
            "image_count": torch.ones(3),
        }
    )


def _exchange_without_noise(client: LightClient, round_no: int, payload: bytes) -> None:
    """ExchangeProjections as a client with projection DP off sends it: no noise declared,
    epsilon reported as 0."""
    client.stub.ExchangeProjections(
        coordinator_pb2.ProjectionExchangeRequest(
            round=round_no,
            projections=common_pb2.TensorPayload(
                safetensors=payload, payload_sha256=hashlib.sha256(payload).digest()
            ),
            epsilon_spent=0.0,
        ),
        timeout=10,
    )


def _wait_committed(srv: AttackServer, round_no: int) -> None:
    wait_for(lambda: srv.engine.run.last_committed_round >= round_no, 30, f"round {round_no}")


def test_releases_without_the_mandated_noise_are_refused(tmp_path: Path) -> None:
    with attack_server(tmp_path, rounds=2, min_clients=2) as srv:
        attacker, honest = srv.client("attacker", 1), srv.client("honest", 2)
        for c in (attacker, honest):
            c.register()
        for c in (attacker, honest):
            wait_train(c, 1)
        no_dp = rpc_error(lambda: _exchange_without_noise(attacker, 1, _exact_means()))
        assert no_dp.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        assert "mandates projection DP" in (no_dp.details() or "")  # type: ignore[attr-defined]
        claimed = rpc_error(lambda: attacker.exchange(1, _exact_means()))  # says sigma 5
        assert claimed.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "less noise" in (claimed.details() or "")  # type: ignore[attr-defined]
        assert honest.exchange(1, projection_payload(2)).epsilon_spent > 0
        start = attacker.download(1)
        for client in (attacker, honest):  # training goes on for the refused client
            assert client.upload(1, start).accepted
        wait_for(lambda: srv.engine.run.last_committed_round >= 1, 30, "round 1 committed")
        refused = [
            e for e in srv.engine.store.events_after(0, 10_000) if e.kind == "projections_refused"
        ]
        assert [e.client_id for e in refused] == ["attacker", "attacker"]
        assert srv.engine.projection_privacy.ledger.releases("attacker") == 0
    record_attack(
        "projections_without_noise",
        "a client with projection DP off sends exact class means and reports epsilon 0",
        "refused (FAILED_PRECONDITION naming the mandate); its training goes on",
        status(no_dp),
    )
    record_attack(
        "projections_claiming_noise",
        f"a client declares the mandated sigma {SIGMA:g} but sends exact class means",
        "refused: the rows' spread is tested against the mandated noise (chi-square, 1e-9 "
        "false refusals)",
        status(claimed),
    )


def test_the_server_counts_epsilon_and_its_budget_ends_releases(tmp_path: Path) -> None:
    # a paired client's release is two Gaussian releases (text and image rows) at sigma / 2
    after = []
    for rounds in (1, 2, 3):
        accountant = PrivacyAccountant()
        accountant.step(SIGMA / 2, 1.0, 2 * rounds)
        after.append(accountant.epsilon(1e-5))
    budget = (after[1] + after[2]) / 2  # room for two rounds of releases, not three
    sections = {"privacy": {"epsilon_budget": budget}}
    with attack_server(tmp_path, sections, rounds=3, min_clients=2) as srv:
        spender, other = srv.client("spender", 1), srv.client("other", 2)
        for c in (spender, other):
            c.register()
        counted = []
        for round_no in (1, 2, 3):
            for c in (spender, other):
                wait_train(c, round_no)
            if round_no < 3:
                # it reports epsilon 0; the server's own count is what it answers
                reply = spender.exchange(round_no, projection_payload(1), epsilon=0.0)
                counted.append(reply.epsilon_spent)
                assert reply.epsilon_budget == budget
            else:
                over = rpc_error(lambda: spender.exchange(3, projection_payload(1)))
                assert over.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
                assert "budget" in (over.details() or "")  # type: ignore[attr-defined]
            start = spender.download(round_no)
            for c in (spender, other):  # the refused client still trains and uploads
                assert c.upload(round_no, start).accepted
            _wait_committed(srv, round_no)
        assert abs(counted[0] - after[0]) < 1e-6 and abs(counted[1] - after[1]) < 1e-6
        with srv.admin() as admin:
            reported = admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
        assert abs(reported.epsilon_spent - after[1]) < 1e-6
        srv.restart()  # the ledger survives: no fresh budget after a restart
        assert abs(srv.engine.projection_privacy.ledger.epsilon("spender") - after[1]) < 1e-6
    record_attack(
        "epsilon_from_the_client",
        "a client reports epsilon 0 with every release and keeps releasing",
        "the server counts each release (2 Gaussian releases per round for text+image rows) "
        "and answers its own epsilon; past the budget the exchange is refused, training goes on",
        f"server epsilon {counted[0]:.2f}, {counted[1]:.2f} after rounds 1, 2 (client said 0); "
        f"round 3 refused: {status(over)[:90]}...",
    )
