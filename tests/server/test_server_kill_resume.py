"""kill -9 the real `crossfed server` process mid-round, restart it on the same state dir:
the run completes, no round is counted twice, the final checkpoint loads."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from crossfed.common.wire.tensor_codec import decode_tensors
from crossfed.server.state.sqlite import SqliteStateStore
from crossfed.v1 import coordinator_pb2

from tests.support.grpc_fixtures import start_server_process
from tests.support.ports import free_port
from tests.support.scripted_client import ScriptedClient
from tests.support.small_model import SMALL_MODEL

pytestmark = pytest.mark.integration  # starts real processes


def _wait_ready(
    client: ScriptedClient, proc: subprocess.Popen[bytes], timeout: float = 300
) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, "server exited during start-up"
        try:
            client.register()
            return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            time.sleep(0.2)
    raise AssertionError("server did not come up")


def _wait_train(client: ScriptedClient, round_no: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        hb = client.heartbeat()
        if hb.action == coordinator_pb2.ACTION_TRAIN:
            assert hb.round == round_no, (hb.round, round_no)
            return
        time.sleep(0.05)
    raise AssertionError(f"{client.client_id} not told to train round {round_no}")


def _train_and_upload(client: ScriptedClient, round_no: int) -> None:
    start = client.download(round_no)
    update = {k: (v + 1.0 if v.is_floating_point() else v) for k, v in start.items()}
    assert client.upload(round_no, update).accepted


@pytest.mark.long  # over ~20 s on 2 cores: .ci/run's own stage
def test_kill9_mid_round_then_resume_completes_without_double_count(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    config = tmp_path / "server.yaml"
    config.write_text(
        yaml.safe_dump(
            {"model": SMALL_MODEL, "rounds": {"rounds": 3, "min_clients": 2,
                                              "round_deadline_s": 60},
             "update_bound": {"max_norm_ratio": None}}  # exact +1 steps, never clipped
        )
    )  # fmt: skip
    log = tmp_path / "server.log"
    port = free_port()
    target = f"127.0.0.1:{port}"
    a, b = ScriptedClient(target, "alice"), ScriptedClient(target, "bob")

    proc = start_server_process(state_dir, config, port, log)
    try:
        _wait_ready(a, proc)
        b.register()
        for c in (a, b):
            _wait_train(c, 1)
        initial = a.download(1)
        for c in (a, b):
            _train_and_upload(c, 1)
        _wait_train(a, 2)
        _train_and_upload(a, 2)  # counted only in the running sum of round 2 ...
        os.kill(proc.pid, signal.SIGKILL)  # ... which dies here
        proc.wait(timeout=10)

        proc = start_server_process(state_dir, config, port, log)
        _wait_ready(a, proc)
        b.register()
        for c in (a, b):
            _wait_train(c, 2)  # alice is asked again: her upload died with the process
        for c in (a, b):
            _train_and_upload(c, 2)
        _wait_train(a, 3)
        os.kill(proc.pid, signal.SIGKILL)  # round 3 open, nothing uploaded
        proc.wait(timeout=10)

        proc = start_server_process(state_dir, config, port, log)
        _wait_ready(a, proc)
        b.register()
        for c in (a, b):
            _wait_train(c, 3)
            _train_and_upload(c, 3)
        end = time.monotonic() + 30
        while a.heartbeat().action != coordinator_pb2.ACTION_DONE:
            assert time.monotonic() < end, "run did not finish"
            time.sleep(0.1)
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        a.close(), b.close()

    store = SqliteStateStore(state_dir / "state.db")
    run = store.get_run()
    assert run is not None and run.state == "completed" and run.last_committed_round == 3
    committed = sorted(r.round for r in store.list_rounds() if r.state == "committed")
    assert committed == [1, 2, 3]
    interrupted = [r for r in store.list_rounds() if "restarted" in r.message]
    assert sorted(r.round for r in interrupted) == [2, 3]
    store.close()
    final = decode_tensors((state_dir / "checkpoints" / "global-000003.safetensors").read_bytes())
    for key, value in initial.items():
        if value.is_floating_point():  # +1 per committed round, exactly three times
            assert torch.allclose(final[key], value + 3.0, atol=1e-5), key
        else:
            assert torch.equal(final[key], value)
