"""Soak: kill -9 the server at random moments (during rounds, uploads, commits) while two
scripted clients keep working; after each restart the run continues, and in the end every
round is committed exactly once and the final checkpoint loads. Slow: several restarts."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml
from crossfed.common.wire.tensor_codec import decode_tensors
from crossfed.server.model_bootstrap import build_initial_model
from crossfed.server.state.sqlite import SqliteStateStore
from crossfed.v1 import coordinator_pb2

from tests.support.grpc_fixtures import start_server_process
from tests.support.ports import free_port
from tests.support.scripted_client import ScriptedClient
from tests.support.small_model import SMALL_MODEL, small_model_config

pytestmark = pytest.mark.integration  # starts real processes

ROUNDS = 120  # the run must outlast 4 kills ~6-9 s apart; rounds take ~0.05-0.5 s (40 ran out)


def _client_loop(client: ScriptedClient, stop: threading.Event, errors: list[str]) -> None:
    """Register, then heartbeat / download / upload until DONE, riding out server deaths."""
    registered = False
    while not stop.is_set():
        try:
            if not registered:
                client.register()
                registered = True
            hb = client.heartbeat()
            if hb.action == coordinator_pb2.ACTION_DONE:
                return
            if hb.action == coordinator_pb2.ACTION_REGISTER:
                registered = False
            elif hb.action == coordinator_pb2.ACTION_TRAIN:
                start = client.download(hb.round)
                update = {k: (v + 1.0 if v.is_floating_point() else v) for k, v in start.items()}
                client.upload(hb.round, update)
            time.sleep(0.05)
        except grpc.RpcError as exc:
            if exc.code() not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.CANCELLED,
                grpc.StatusCode.ALREADY_EXISTS,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.INTERNAL,
                grpc.StatusCode.UNKNOWN,
            ):
                errors.append(f"{client.client_id}: {exc.code()} {exc.details()}")
                return
            time.sleep(0.1)


@pytest.mark.slow
def test_random_kill9_soak(tmp_path: Path) -> None:
    rng = random.Random(1234)
    state_dir = tmp_path / "state"
    config = tmp_path / "server.yaml"
    config.write_text(
        yaml.safe_dump(
            {"model": SMALL_MODEL,
             "rounds": {"rounds": ROUNDS, "min_clients": 2, "round_deadline_s": 30},
             "update_bound": {"max_norm_ratio": None}}  # exact +1 steps, never clipped
        )
    )  # fmt: skip
    log = tmp_path / "server.log"
    port = free_port()
    target = f"127.0.0.1:{port}"
    clients = [ScriptedClient(target, f"c{i}") for i in range(2)]
    stop = threading.Event()
    errors: list[str] = []
    proc = start_server_process(state_dir, config, port, log)
    threads = [threading.Thread(target=_client_loop, args=(c, stop, errors)) for c in clients]
    for t in threads:
        t.start()
    kills = 0
    try:
        for _ in range(4):
            time.sleep(4 + rng.uniform(0.0, 3.0))  # start-up ~3-5 s, then somewhere in the rounds
            if proc.poll() is not None:
                break
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            kills += 1
            proc = start_server_process(state_dir, config, port, log)
        for t in threads:
            t.join(timeout=180)
        assert not errors, errors
        assert all(not t.is_alive() for t in threads), "clients never told DONE"
        assert proc.wait(timeout=30) == 0
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for c in clients:
            c.close()
    assert kills >= 2
    store = SqliteStateStore(state_dir / "state.db")
    run = store.get_run()
    assert run is not None and run.state == "completed" and run.last_committed_round == ROUNDS
    committed = sorted(r.round for r in store.list_rounds() if r.state == "committed")
    assert committed == list(range(1, ROUNDS + 1))
    store.close()
    # the initial model is deterministic (seed 0); each committed round adds exactly +1
    initial = build_initial_model(small_model_config(), seed=0).state
    final_path = state_dir / "checkpoints" / f"global-{ROUNDS:06d}.safetensors"
    final = decode_tensors(final_path.read_bytes())
    for key, value in initial.items():
        if value.is_floating_point():
            assert float((final[key] - value - ROUNDS).abs().max()) < 1e-4, key
