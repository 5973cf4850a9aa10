"""The compose deployment, run for real as local processes: cert-init job -> server (healthy via
its own healthcheck) -> text-only, image-only and paired clients -> 2 rounds complete -> the
admin tool (profile "tools") reports the run completed -> the server stops cleanly on SIGTERM.

The TLS default runs in the default suite (about 40 s on 2 cores); mTLS and the insecure-dev
overlay are the same scenario marked slow."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from crossfed.common.crypto.identity import ClientCredential

from tests.support.deploy.compose_local_runner import LocalComposeRunner, parse_dockerfile
from tests.support.deploy.compose_project import load_project
from tests.support.deploy.deploy_paths import (
    CLIENT_MODALITIES,
    COMBINATIONS,
    DOCKERFILE,
    TINY_RUN_ENV,
)

pytestmark = pytest.mark.integration  # starts real processes

ROUNDS = int(TINY_RUN_ENV["CROSSFED_ROUNDS"])


def run_deployment(combination: str, root: Path) -> None:
    project = load_project(COMBINATIONS[combination], TINY_RUN_ENV)
    runner = LocalComposeRunner(project, parse_dockerfile(DOCKERFILE), root)
    secure = combination != "insecure"
    started = time.monotonic()
    try:
        order = runner.up(timeout_s=240)
        assert order[0] in ("cert-init", "insecure-warning") and "admin" not in order
        for name in CLIENT_MODALITIES:
            code = runner.wait_exit(name, timeout_s=300)
            assert code == 0, runner.processes[name].output()[-3000:]
        for name, modality in CLIENT_MODALITIES.items():
            output = runner.processes[name].output()
            assert f"run finished: {ROUNDS} round(s) trained" in output, output[-2000:]
            state = runner.mounts(name)["/var/lib/crossfed"] / "state"
            records = [
                json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()
            ]
            assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
            assert {r["modality"] for r in records} == {modality}
            assert all(r["encrypted"] for r in records)  # uploads are encrypted in every mode
            client_id = project["services"][name]["environment"]["CROSSFED_CLIENT_ID"]
            if secure:  # enrolled over TLS with the kit's one-time token
                assert ClientCredential.load(state / "credential.json").client_id == client_id
            else:
                assert (state / "client_id").read_text().strip() == client_id
        status = runner.run("admin", ["crossfed", "admin", "--json", "status"], timeout_s=60)
        assert status.returncode == 0, status.stdout + status.stderr
        body = json.loads(status.stdout)
        assert body["run_state"] == "completed"
        assert body["last_committed_round"] == body["total_rounds"] == ROUNDS
        assert runner.healthy("server")  # still serving after the run
        server = runner.processes["server"]
        server.popen.send_signal(signal.SIGTERM)
        assert server.popen.wait(timeout=60) == 0
        assert "run completed" in server.output()
    finally:
        runner.stop_all()
        print(
            f"{combination}: compose run as local processes took {time.monotonic() - started:.1f} s"
        )


@pytest.mark.long  # over ~20 s on 2 cores: .ci/run's own stage
def test_compose_tls_run_completes(tmp_path: Path) -> None:
    run_deployment("base", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("combination", ["mtls", "insecure", "persistent+mtls"])
def test_compose_overlay_runs_complete(tmp_path: Path, combination: str) -> None:
    run_deployment(combination, tmp_path)
