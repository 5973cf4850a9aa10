"""`crossfed admin ...` end to end against a real server on 127.0.0.1: JSON and human output
after a real round, model export bit-identical to the checkpoint, live config, client
removal, enrollment tokens, watch; and one-line errors with exit 1 for a wrong credential,
an unreachable server and requests the server refuses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from admin_server_fixtures import RoundClient, free_port, run_one_round, running_server
from crossfed.common.crypto.certificates import issue_certificate
from crossfed.common.crypto.identity import ClientCredential
from crossfed.common.model.model_bundle import load_bundle
from crossfed.v1 import coordinator_pb2, coordinator_pb2_grpc
from typer.testing import CliRunner

from crossfed.cli import app

runner = CliRunner()


def admin(args: list[str], *cmd: str, columns: int = 200) -> tuple[int, str, str]:
    """Run `crossfed admin <args> <cmd>` in-process; (exit code, stdout, stderr)."""
    result = runner.invoke(app, ["admin", *args, *cmd], env={"COLUMNS": str(columns)})
    return result.exit_code, result.stdout, result.stderr


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


def test_cli_after_a_round(tmp_path: Path) -> None:
    with running_server(tmp_path, rounds=2) as ts:
        conn = ts.cli_args()
        clients = [RoundClient(ts, cid, ts.enroll_client(cid)) for cid in ("c1", "c2")]
        for client in clients:
            client.register()
        assert run_one_round(clients) == 1

        code, out, _ = admin(conn, "status", "--json")
        assert code == 0
        status = json.loads(out)
        assert status["last_committed_round"] == 1 and status["total_rounds"] == 2
        assert status["run_state"] == "running"
        assert status["strategy"] == "fedavg" and status["strategy_params"] == {}
        assert status["central_dp"] is False
        code, out, _ = admin(conn, "status")
        assert code == 0 and "last committed 1" in out and "acc_both=0.5" in out
        assert re.search(r"strategy\s+fedavg", out)

        code, out, _ = admin(conn, "clients", "--json")
        rows = json.loads(out)
        assert [(r["client_id"], r["modality"], r["rounds_completed"]) for r in rows] == [
            ("c1", "both", 1),
            ("c2", "both", 1),
        ]
        code, out, _ = admin(conn, "rounds", "--json")
        committed = [r for r in json.loads(out) if r["state"] == "committed"]
        assert [(r["round"], r["received"], r["selected"]) for r in committed] == [(1, 2, 2)]
        code, out, _ = admin(conn, "rounds")
        assert code == 0 and "committed" in out
        # a terminal of 80 columns: one line per attempt, nothing wider (details in --json)
        code, out, _ = admin(conn, "rounds", columns=80)
        lines = out.splitlines()
        assert code == 0 and max(len(line) for line in lines) <= 80, out
        assert [line.split()[:3] for line in lines if "committed" in line] == [
            ["1", "committed", "2/2"]
        ]
        code, out, _ = admin(conn, "clients", "--json")
        assert json.loads(out)[0]["rows"] == {"both": 9, "text_only": 1, "image_only": 0}
        code, out, _ = admin(conn, "clients", columns=80)
        assert code == 0 and max(len(line) for line in out.splitlines()) <= 80, out
        assert [line.split()[:5] for line in out.splitlines() if "c1" in line] == [
            ["c1", "both", "9", "1", "0"]
        ]

        # export: a model bundle holding the server's checkpoint, written atomically
        checkpoint = ts.server.engine.checkpoints.load(1)
        target = tmp_path / "model.safetensors"
        code, out, err = admin(conn, "export-model", str(target), "--json")
        assert code == 0, err
        info = json.loads(out)
        bundle = load_bundle(target)
        assert bundle.round == 1 and bundle.class_names == ("0", "1", "2")
        assert bundle.state.keys() == checkpoint.keys()
        assert all(torch.equal(bundle.state[k], checkpoint[k]) for k in checkpoint)
        assert target.read_bytes() == ts.server.engine.bundles.path_of(1).read_bytes()
        assert info["round"] == 1 and info["bytes"] == target.stat().st_size
        assert info["tensors"] == len(checkpoint)
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temp file left
        code, _, err = admin(conn, "export-model", str(target))
        assert code == 1 and "already exists" in one_error_line(err)
        initial = tmp_path / "initial.safetensors"
        code, out, _ = admin(conn, "export-model", str(initial), "--round", "0", "--force")
        assert code == 0 and "round 1" in out  # 0 = latest committed
        code, _, err = admin(conn, "export-model", str(tmp_path / "x.safetensors"), "--round", "9")
        assert code == 1 and "not committed" in one_error_line(err)
        assert not (tmp_path / "x.safetensors").exists()

        # watch: the history as JSON lines, and as human lines when not a TTY
        code, out, _ = admin(conn, "watch", "--no-follow", "--json")
        events = [json.loads(line) for line in out.splitlines()]
        kinds = [e["kind"] for e in events]
        assert code == 0 and "round_committed" in kinds and kinds.count("upload_accepted") == 2
        code, out, _ = admin(conn, "watch", "--no-follow")
        assert code == 0 and "round_committed" in out and "round 1" in out
        for client in clients:
            client.close()


def test_cli_run_control_and_config(tmp_path: Path) -> None:
    with running_server(tmp_path, autostart=False, rounds=3) as ts:
        conn = ts.cli_args()
        code, _, err = admin(conn, "resume")
        assert code == 1
        assert one_error_line(err) == "error: run is idle, only a paused run can resume"
        code, out, _ = admin(conn, "start", "--rounds", "5", "--min-clients", "1", "--json")
        assert code == 0 and json.loads(out)["run_state"] == "running"
        assert ts.server.engine.policy.min_clients == 1 and ts.server.engine.run.total_rounds == 5
        code, out, _ = admin(conn, "pause", "--reason", "test")
        assert code == 0 and out.startswith("run paused")
        code, out, _ = admin(conn, "resume")
        assert code == 0 and out.startswith("run running")

        code, out, _ = admin(conn, "set", "rounds.min_clients=2", "rounds.round_deadline_s=45")
        assert code == 0 and "rounds.round_deadline_s = 45.0" in out
        policy = ts.server.engine.policy
        assert (policy.min_clients, policy.round_deadline_s) == (2, 45.0)
        code, _, err = admin(conn, "set", "rounds.min_clients=abc")
        assert code == 1 and "rounds.min_clients" in one_error_line(err)
        code, _, err = admin(conn, "set", "model.num_classes=4")
        assert code == 1 and "cannot be changed" in one_error_line(err)
        code, _, err = admin(conn, "set", "no-equals-sign")
        assert code == 2 and "KEY=VALUE" in one_error_line(err)
        assert ts.server.engine.policy == policy

        code, out, _ = admin(conn, "enroll-token", "--client-id", "erin", "--json")
        token = json.loads(out)["token"]
        with ts.channel() as channel:
            enrolled = coordinator_pb2_grpc.CoordinatorStub(channel).Enroll(
                coordinator_pb2.EnrollRequest(enrollment_token=token), timeout=10
            )
        assert enrolled.client_id == "erin"
        erin = RoundClient(ts, "erin", ClientCredential("erin", bytes(enrolled.client_secret)))
        erin.register()
        code, out, _ = admin(conn, "remove-client", "erin")
        assert code == 0 and "removed client erin" in out
        code, _, err = admin(conn, "remove-client", "erin")
        assert code == 1 and "not known" in one_error_line(err)
        erin.close()

        code, out, _ = admin(conn, "stop", "--json")
        assert code == 0 and json.loads(out)["run_state"] == "stopped"


def test_cli_wrong_credentials_one_line(tmp_path: Path) -> None:
    with running_server(tmp_path) as ts:
        client_file = tmp_path / "client.json"
        ts.enroll_client("frank").save(client_file)
        base = ["--server", ts.target, "--certs-dir", str(ts.certs)]
        code, out, err = admin([*base, "--credential", str(client_file)], "status")
        assert code == 1 and out == ""
        assert one_error_line(err).startswith("error: permission denied:")

        real = ClientCredential.load(ts.admin_credential)
        forged_file = tmp_path / "forged.json"
        ClientCredential(real.client_id, b"f" * 32, real.role).save(forged_file)
        code, _, err = admin([*base, "--credential", str(forged_file)], "stop")
        assert code == 1 and one_error_line(err).startswith("error: authentication failed")
        assert ts.server.engine.run.state == "running"

        code, _, err = admin(base, "status")  # no credential at all
        assert code == 1 and "--credential" in one_error_line(err)
        missing = tmp_path / "nope.json"
        code, _, err = admin([*base, "--credential", str(missing)], "status")
        assert code == 1 and "nope.json" in one_error_line(err)
        code, _, err = admin(["--server", "not-an-address"], "status")
        assert code == 2 and "--server" in one_error_line(err)


def test_cli_unreachable_server_real_process(tmp_path: Path) -> None:
    """A real `python -m crossfed` process: exit 1, one line on stderr, no traceback."""
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "CROSSFED_SERVER": address, "CROSSFED_INSECURE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "crossfed", "admin", "--timeout", "5", "status"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc.stderr)
    assert line.startswith(f"error: cannot reach the server at {address}")
    assert proc.stdout == ""


@pytest.mark.parametrize("command", [["clients"], ["watch", "--no-follow"]])
def test_cli_unreachable_in_process(command: list[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    code, _, err = admin(["--server", address, "--insecure", "--timeout", "5"], *command)
    assert code == 1 and one_error_line(err).startswith("error: cannot reach the server")


def test_cli_mtls_needs_the_admin_certificate(tmp_path: Path) -> None:
    with running_server(tmp_path, mtls=True) as ts:
        issue_certificate(ts.certs, "admin", "ops")
        code, out, err = admin([*ts.cli_args(), "--client-cert", "ops"], "status", "--json")
        assert code == 0, err
        assert json.loads(out)["run_state"] == "running"
        code, _, err = admin(ts.cli_args(), "status")  # no client certificate: handshake fails
        assert code == 1 and one_error_line(err).startswith("error: cannot reach the server")
        code, _, err = admin([*ts.cli_args(), "--client-cert", "nobody"], "status")
        assert code == 1 and "TLS setup failed" in one_error_line(err)
