"""SIGKILL the real server at named points (registration, mid-upload, mid-aggregation, during
and right after the checkpoint write, before the DB commit), restart it on the same state dir,
and check the final state: the run completes, rounds 1..R are committed exactly once each and
in order, every committed checkpoint equals the exact eq.-15 average of the uploads its
attempt counted, and no checkpoint file is torn or left half-written."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from tests.support.ports import free_port
from tests.support.reliability.fault_injecting_server import FAULT_POINTS
from tests.support.reliability.reliability_harness import (
    LightClient,
    ResilientClientThread,
    ScenarioFailure,
    ServerProcess,
    assert_checkpoints_whole,
    record_result,
    rounds_of,
    run_row,
    verify_committed_history,
    write_server_config,
)
from tests.support.small_model import small_model_config
from tests.support.standin_model import standin_state

ROUNDS = 3
CLIENTS = 3


def _initial_model() -> dict[str, torch.Tensor]:
    return standin_state(small_model_config(), 0)


def run_kill_chain(
    root: Path, faults: list[tuple[str, int]], *, keep_checkpoints: int = 3
) -> dict[str, int]:
    """Run a 3-round federation through a sequence of server deaths, one per ``faults`` entry
    (point, hit on that start), then a clean start that must finish the run. Returns counts."""
    state_dir = root / "state"
    config = write_server_config(root / "server.yaml", rounds=ROUNDS, min_clients=CLIENTS)
    port = free_port()
    extra = ("--keep-checkpoints", str(keep_checkpoints))
    stop = threading.Event()
    clients = [LightClient(f"127.0.0.1:{port}", f"c{i}", index=i) for i in range(CLIENTS)]
    threads = [ResilientClientThread(c, stop) for c in clients]
    server: ServerProcess | None = None
    restarts = 0
    try:
        for index, (point, hit) in enumerate(faults):
            server = ServerProcess.start(state_dir, config, port, fault=point, hit=hit,
                                         extra_args=extra)  # fmt: skip
            server.wait_ready()
            if index == 0:
                for thread in threads:
                    thread.start()
            code = server.wait_exit(timeout_s=60)
            fired = server.fault_fired()
            if fired != point:
                raise ScenarioFailure(
                    f"server exited {code} without reaching {point}:\n{server.log_tail()}"
                )
            restarts += 1
            assert_checkpoints_whole_or_tmp(state_dir)
        server = ServerProcess.start(state_dir, config, port, extra_args=extra)
        if not faults:
            server.wait_ready()
            for thread in threads:
                thread.start()
        code = server.wait_exit(timeout_s=90)
        if code != 0:
            raise ScenarioFailure(f"final server exited {code}:\n{server.log_tail()}")
    finally:
        stop.set()
        if server is not None:
            server.kill()
        for thread in threads:
            thread.join(timeout=10)
        for client in clients:
            client.close()
    errors = [e for t in threads for e in t.errors]
    assert not errors, errors
    state, last, total = run_row(state_dir)
    assert (state, last, total) == ("completed", ROUNDS, ROUNDS), server.log_tail()
    committed = verify_committed_history(state_dir, _initial_model(), lambda cid: int(cid[1:]))
    assert committed == ROUNDS
    assert assert_checkpoints_whole(state_dir)[-1] == ROUNDS
    attempts = rounds_of(state_dir)
    return {"restarts": restarts, "attempts": len(attempts), "committed": committed}


def assert_checkpoints_whole_or_tmp(state_dir: Path) -> None:
    """Right after a kill: final checkpoint files are whole (a temp file may remain; the next
    start must clean it, which `assert_checkpoints_whole` checks at the end)."""
    from crossfed.common.wire.tensor_codec import decode_tensors

    for path in sorted((state_dir / "checkpoints").glob("global-*.safetensors")):
        decode_tensors(path.read_bytes())


@pytest.mark.long  # over ~20 s on 2 cores: .ci/run's own stage
@pytest.mark.integration
def test_kill_chain_fast(tmp_path: Path) -> None:
    """One run survives four deaths: mid-upload, mid-checkpoint-write (half-written temp file
    on disk), after round 2's checkpoint landed but before its DB commit (keep_checkpoints=1,
    so the previous round's file is the only other one), and just before the DB commit."""
    started = time.monotonic()
    faults = [("upload_chunk", 1), ("checkpoint_write", 1), ("checkpoint_renamed", 2),
              ("db_commit", 1)]  # fmt: skip
    counts = run_kill_chain(tmp_path, faults, keep_checkpoints=1)
    assert counts["restarts"] == len(faults)
    record_result(
        "server_kill_fast",
        faults=[p for p, _ in faults],
        restarts=counts["restarts"],
        round_attempts=counts["attempts"],
        committed_rounds=counts["committed"],
        seconds=round(time.monotonic() - started, 1),
    )


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("point", sorted(FAULT_POINTS))
@pytest.mark.parametrize("hit", [1, 2])
def test_kill_at_each_point(tmp_path: Path, point: str, hit: int) -> None:
    """Every crash point on its own, at its first and second occurrence."""
    counts = run_kill_chain(tmp_path, [(point, hit)], keep_checkpoints=1)
    record_result(f"server_kill_{point}_{hit}", restarts=counts["restarts"],
                  round_attempts=counts["attempts"], committed_rounds=counts["committed"])  # fmt: skip


@pytest.mark.integration
@pytest.mark.slow
def test_kill_chain_every_point(tmp_path: Path) -> None:
    """One run through a death at every crash point in turn, then a clean finish."""
    faults = [(p, 1) for p in FAULT_POINTS]
    counts = run_kill_chain(tmp_path, faults, keep_checkpoints=1)
    record_result("server_kill_chain_all", faults=list(FAULT_POINTS),
                  restarts=counts["restarts"], round_attempts=counts["attempts"],
                  committed_rounds=counts["committed"])  # fmt: skip


def test_scenario_failure_detects_a_wrong_average(tmp_path: Path) -> None:
    """The history check is not vacuous: a checkpoint that is not the exact average fails."""
    from crossfed.server.checkpoints import CheckpointStore
    from crossfed.server.state.records import RoundRecord, RunRecord, UploadRecord
    from crossfed.server.state.sqlite import SqliteStateStore

    state_dir = tmp_path / "state"
    store = SqliteStateStore(state_dir / "state.db")
    initial = _initial_model()
    store.put_run(RunRecord("r", "completed", 1, 1, 0.0, "", 0.0))
    store.put_round(RoundRecord(round=1, attempt=1, state="committed", started_unix_s=0.0,
                                deadline_unix_s=0.0, selected=["c0", "c1"], received=2))  # fmt: skip
    for i in range(2):
        store.add_upload(UploadRecord(f"u{i}", f"c{i}", 1, 1, 3 + 2 * i, 0.0, "", {}, {}))
    store.close()
    wrong = {k: (v + 1.0 if v.is_floating_point() else v) for k, v in initial.items()}
    CheckpointStore(state_dir / "checkpoints").save(1, wrong)
    with pytest.raises(ScenarioFailure, match="exact average"):
        verify_committed_history(state_dir, initial, lambda cid: int(cid[1:]))
