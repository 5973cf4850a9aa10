"""Admin RPCs end to end against a real TLS + HMAC-authenticated server on 127.0.0.1:
run-state transitions (valid and invalid), status/clients/rounds after a real round,
live config (valid applied, invalid leaves everything unchanged), client removal with
credential revocation, enrollment tokens, the event stream, and admin-only access."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import grpc
import pytest
from crossfed.common.crypto.identity import ClientCredential
from crossfed.common.crypto.rpc_auth import authenticated_channel
from crossfed.v1 import admin_pb2, admin_pb2_grpc, coordinator_pb2

from tests.support.admin_server_fixtures import RoundClient, run_one_round, running_server, wait_for

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()  # type: ignore[operator]
    return err.value.code()  # type: ignore[no-any-return]


def test_run_lifecycle_status_clients_rounds(tmp_path: Path) -> None:
    with running_server(tmp_path, autostart=False, rounds=3) as ts:
        cred_file = ts.admin_credential
        assert stat.S_IMODE(os.stat(cred_file).st_mode) == 0o600
        with ts.admin() as admin:
            run = admin_pb2.RunControlRequest()
            status = admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
            assert status.run_state == "idle" and status.total_rounds == 3
            # nothing to pause or resume before the run started
            assert _code(lambda: admin.ResumeRun(run, timeout=10)) == FAILED_PRECONDITION
            assert _code(lambda: admin.PauseRun(run, timeout=10)) == FAILED_PRECONDITION
            started = admin.StartRun(admin_pb2.StartRunRequest(rounds=4), timeout=10)
            assert started.run_state == "running"
            assert ts.server.engine.run.total_rounds == 4
            with pytest.raises(grpc.RpcError) as err:
                admin.StartRun(admin_pb2.StartRunRequest(), timeout=10)
            assert err.value.code() == FAILED_PRECONDITION
            assert "already running" in (err.value.details() or "")

            clients = [
                RoundClient(ts, cid, ts.enroll_client(cid), num_samples=n)
                for cid, n in (("alice", 10), ("bob", 30))
            ]
            for client in clients:
                client.register()
            assert run_one_round(clients) == 1
            assert ts.server.engine.run.last_committed_round == 1

            status = admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
            assert (status.run_state, status.last_committed_round) == ("running", 1)
            assert sum(status.clients_by_state.values()) == 2
            assert status.last_metrics.values["acc_both"] == pytest.approx(0.5)
            listed = admin.ListClients(admin_pb2.ListClientsRequest(), timeout=10).clients
            assert {(c.client_id, c.num_samples, c.rounds_completed) for c in listed} == {
                ("alice", 10, 1),
                ("bob", 30, 1),
            }
            wait_for(lambda: ts.server.engine.open_round is not None, what="round 2 to open")
            rounds = admin.ListRounds(admin_pb2.ListRoundsRequest(), timeout=10).rounds
            assert [(r.round, r.attempt, r.state, r.received, r.num_samples) for r in rounds] == [
                (2, 1, "open", 0, 0),
                (1, 1, "committed", 2, 40),
            ]
            assert admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10).current_round == 2
            limited = admin.ListRounds(admin_pb2.ListRoundsRequest(limit=1), timeout=10).rounds
            assert [r.round for r in limited] == [2]

            paused = admin.PauseRun(admin_pb2.RunControlRequest(reason="maintenance"), timeout=10)
            assert paused.run_state == "paused"
            assert _code(lambda: admin.PauseRun(run, timeout=10)) == FAILED_PRECONDITION
            # pausing lets the open round finish, then no new round starts
            assert run_one_round(clients) == 2
            time.sleep(0.3)  # several server ticks
            assert ts.server.engine.open_round is None
            hb = clients[0].heartbeat()
            assert hb.action == coordinator_pb2.ACTION_WAIT and hb.run_state == "paused"
            assert admin.ResumeRun(run, timeout=10).run_state == "running"
            assert _code(lambda: admin.ResumeRun(run, timeout=10)) == FAILED_PRECONDITION
            wait_for(lambda: ts.server.engine.open_round is not None, what="round 3 to open")

            assert admin.StopRun(run, timeout=10).run_state == "stopped"
            again = admin.StopRun(run, timeout=10)
            assert again.run_state == "stopped" and "already" in again.message
            assert _code(lambda: admin.ResumeRun(run, timeout=10)) == FAILED_PRECONDITION
            assert _code(lambda: admin.StartRun(admin_pb2.StartRunRequest(), timeout=10)) == (
                FAILED_PRECONDITION
            )
            assert clients[1].heartbeat().action == coordinator_pb2.ACTION_DONE
            newest = admin.ListRounds(admin_pb2.ListRoundsRequest(limit=1), timeout=10).rounds[0]
            assert (newest.round, newest.state) == (3, "failed") and "stopped" in newest.message

            # the event stream saw the whole story, in order
            events = list(
                admin.StreamEvents(admin_pb2.StreamEventsRequest(follow=False), timeout=10)
            )
            kinds = [e.kind for e in events]
            for earlier, later in [
                ("run_running", "round_started"),
                ("round_started", "round_committed"),
                ("run_paused", "round_committed"),
                ("run_paused", "run_running"),
                ("run_running", "run_stopped"),
            ]:
                assert kinds.index(earlier) < len(kinds) - 1 - kinds[::-1].index(later)
            assert kinds.count("upload_accepted") == 4
            ids = [e.event_id for e in events]
            assert ids == sorted(ids) and len(set(ids)) == len(ids)
            tail = list(
                admin.StreamEvents(
                    admin_pb2.StreamEventsRequest(after_event_id=ids[-2], follow=False),
                    timeout=10,
                )
            )
            assert [e.event_id for e in tail] == [ids[-1]]
        for client in clients:
            client.close()


def test_update_config_valid_and_invalid(tmp_path: Path) -> None:
    with running_server(tmp_path, rounds=5, min_clients=2) as ts:
        engine = ts.server.engine
        with ts.admin() as admin:
            ok = admin.UpdateConfig(
                admin_pb2.UpdateConfigRequest(
                    values={
                        "rounds.min_clients": "3",
                        "rounds.fraction": "0.5",
                        "privacy.epsilon_budget": "4",
                    }
                ),
                timeout=10,
            )
            assert dict(ok.applied) == {
                "rounds.min_clients": "3",
                "rounds.fraction": "0.5",
                "privacy.epsilon_budget": "4.0",
            }
            assert (engine.policy.min_clients, engine.policy.fraction) == (3, 0.5)
            assert engine.epsilon_budget == 4.0
            before = (engine.policy, engine.run.total_rounds, engine.epsilon_budget)
            bad_requests = [
                {"rounds.min_clients": "0"},  # pydantic: gt=0
                {"rounds.fraction": "1.5"},  # pydantic: le=1
                {"rounds.round_deadline_s": "soon"},  # not a number
                {"tls.insecure": "true"},  # not a live key
                {"listen": "0.0.0.0:1"},  # not a live key
                {"rounds.rounds": "7", "rounds.min_clients": "-1"},  # one bad value: nothing
                {},
            ]
            for values in bad_requests:
                with pytest.raises(grpc.RpcError) as err:
                    admin.UpdateConfig(admin_pb2.UpdateConfigRequest(values=values), timeout=10)
                assert err.value.code() == INVALID_ARGUMENT, values
                assert (engine.policy, engine.run.total_rounds, engine.epsilon_budget) == before
            details = ""
            try:
                admin.UpdateConfig(
                    admin_pb2.UpdateConfigRequest(values={"rounds.fraction": "1.5"}), timeout=10
                )
            except grpc.RpcError as exc:
                details = exc.details() or ""
            assert "rounds.fraction" in details and "1.5" in details
            cleared = admin.UpdateConfig(
                admin_pb2.UpdateConfigRequest(values={"privacy.epsilon_budget": "none"}),
                timeout=10,
            )
            assert cleared.applied["privacy.epsilon_budget"] == "None"
            assert engine.epsilon_budget == 0.0
            assert admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10).total_rounds == 5


def test_remove_client_revokes_and_tokens(tmp_path: Path) -> None:
    with running_server(tmp_path) as ts:
        carol = RoundClient(ts, "carol", ts.enroll_client("carol"))
        carol.register()
        with ts.admin() as admin:
            assert admin.RemoveClient(
                admin_pb2.RemoveClientRequest(client_id="carol"), timeout=10
            ).removed
            listed = admin.ListClients(admin_pb2.ListClientsRequest(), timeout=10).clients
            assert [(c.client_id, c.state) for c in listed] == [("carol", "removed")]
            with pytest.raises(grpc.RpcError) as err:  # its credential is revoked
                carol.heartbeat()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert (
                _code(
                    lambda: admin.RemoveClient(
                        admin_pb2.RemoveClientRequest(client_id="nobody"), timeout=10
                    )
                )
                == grpc.StatusCode.NOT_FOUND
            )
            assert (
                _code(  # the admin principal is not a client
                    lambda: admin.RemoveClient(
                        admin_pb2.RemoveClientRequest(client_id="admin"), timeout=10
                    )
                )
                == INVALID_ARGUMENT
            )
            assert (
                _code(
                    lambda: admin.CreateEnrollmentToken(
                        admin_pb2.CreateEnrollmentTokenRequest(client_id="bad id!"), timeout=10
                    )
                )
                == INVALID_ARGUMENT
            )
            token = admin.CreateEnrollmentToken(
                admin_pb2.CreateEnrollmentTokenRequest(ttl_s=30), timeout=10
            )
            assert token.token.startswith("cfe_") and token.expires_unix_s > 0
        carol.close()
        # the token never reaches the event log
        events = ts.server.engine.store.events_after(0)
        assert all(token.token not in e.message for e in events)


def test_admin_rpcs_need_the_admin_credential(tmp_path: Path) -> None:
    with running_server(tmp_path) as ts:
        client_cred = ts.enroll_client("dave")
        with ts.channel() as channel:
            as_client = admin_pb2_grpc.AdminStub(authenticated_channel(channel, client_cred))
            assert (
                _code(lambda: as_client.GetStatus(admin_pb2.GetStatusRequest(), timeout=10))
                == grpc.StatusCode.PERMISSION_DENIED
            )
            unsigned = admin_pb2_grpc.AdminStub(channel)
            assert (
                _code(lambda: unsigned.StopRun(admin_pb2.RunControlRequest(), timeout=10))
                == grpc.StatusCode.UNAUTHENTICATED
            )
            admin_cred = ClientCredential.load(ts.admin_credential)
            forged = ClientCredential(admin_cred.client_id, b"x" * 32, admin_cred.role)
            as_forged = admin_pb2_grpc.AdminStub(authenticated_channel(channel, forged))
            assert (
                _code(lambda: as_forged.StopRun(admin_pb2.RunControlRequest(), timeout=10))
                == grpc.StatusCode.UNAUTHENTICATED
            )
        assert ts.server.engine.run.state == "running"


def test_admin_credential_survives_restart(tmp_path: Path) -> None:
    with running_server(tmp_path) as ts:
        first = ts.admin_credential.read_bytes()
    with running_server(tmp_path) as ts:
        assert ts.admin_credential.read_bytes() == first
        with ts.admin() as admin:
            assert admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10).run_id


def test_insecure_server_serves_admin_to_loopback(tmp_path: Path) -> None:
    with running_server(tmp_path, secure=False) as ts, ts.admin() as admin:
        assert admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10).run_state == ("running")
        assert (
            _code(
                lambda: admin.CreateEnrollmentToken(
                    admin_pb2.CreateEnrollmentTokenRequest(), timeout=10
                )
            )
            == FAILED_PRECONDITION
        )
