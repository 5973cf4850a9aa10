"""Disk full (ENOSPC) and read-only state dir (EROFS) at checkpoint time, simulated in-process
by making the checkpoint write raise: the server reports it (an event and an ERROR log line),
does not commit the round, keeps the last good checkpoint, answers the uploading client with
a proper status, and once the disk is writable again the round is re-run and committed."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from crossfed.common import atomic_files
from crossfed.server.server_app import ServerOptions

from tests.support.reliability.reliability_harness import (
    LightClient,
    ResilientClientThread,
    checkpoint_digests,
    inprocess_server,
    recent_events,
    record_result,
    rounds_of,
    run_row,
    verify_committed_history,
    wait_until,
)
from tests.support.small_model import small_model_config
from tests.support.standin_model import standin_state


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_checkpoint_write_failure_is_reported_and_the_round_not_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    state_dir = tmp_path / "state"
    options = ServerOptions(tick_interval_s=0.05, heartbeat_interval_ms=100, auto_start=False,
                            allow_unencrypted_uploads=True)  # fmt: skip
    # every file the server replaces goes through atomic_files.write_atomic
    original = atomic_files.write_atomic
    disk_full = threading.Event()
    failures: list[str] = []

    def write(path: Path, data: Any, mode: int = 0o644, **kw: Any) -> None:
        if disk_full.is_set() and Path(path).name.startswith("global-"):
            failures.append(Path(path).name)
            raise OSError(code, os.strerror(code), str(path))
        original(path, data, mode, **kw)

    monkeypatch.setattr(atomic_files, "write_atomic", write)
    caplog.set_level(logging.WARNING)
    stop = threading.Event()
    with inprocess_server(state_dir, monkeypatch, options, rounds=2, min_clients=2,
                          max_retries_on_failed_round=200) as (server, target):  # fmt: skip
        clients = [LightClient(target, f"c{i}", index=i) for i in range(2)]
        threads = [ResilientClientThread(c, stop) for c in clients]
        try:
            for c in clients:
                c.register()
            server.engine.start()
            for t in threads:
                t.start()
            # generous: a loaded 2-core CI machine once took longer than 20 s here
            wait_until(
                lambda: server.engine.run.last_committed_round == 1,
                60,
                "round 1",
                lambda: recent_events(server) + f"\nclient errors: {[t.errors for t in threads]}",
            )
            disk_full.set()
            good = checkpoint_digests(state_dir)
            wait_until(lambda: bool(failures), 20, "a failed checkpoint write")
            wait_until(
                lambda: any(r.state == "failed" for r in rounds_of(state_dir)), 10, "attempt failed"
            )
            # reported, not committed, last good checkpoint kept
            assert run_row(state_dir)[1] == 1
            assert server.engine.run.last_committed_round == 1
            assert server.engine.run.state == "running"
            failed = [r for r in rounds_of(state_dir) if r.round == 2 and r.state == "failed"]
            assert failed and os.strerror(code) in failed[0].message, failed
            events = server.engine.store.events_after(0, 10_000)
            assert any(e.kind == "checkpoint_failed" and e.round == 2 for e in events)
            assert any(
                r.levelno >= logging.ERROR and "checkpoint" in r.getMessage()
                for r in caplog.records
            )
            current = checkpoint_digests(state_dir)
            assert current.get("global-000001.safetensors") == good["global-000001.safetensors"]
            assert not any(".tmp-" in name for name in current)
            disk_full.clear()  # space freed: the retried round commits
            wait_until(lambda: server.engine.run.state == "completed", 30, "run completed")
        finally:
            stop.set()
            for c in clients:
                c.close()
    errors = [e for t in threads for e in t.errors]
    assert not errors, errors  # the uploading clients never saw UNKNOWN/INTERNAL
    assert (
        verify_committed_history(
            state_dir, standin_state(small_model_config(), 0), lambda c: int(c[1:])
        )
        == 2
    )
    record_result(
        f"disk_full_{errno.errorcode[code]}",
        failed_checkpoint_writes=len(failures),
        failed_attempts=len([r for r in rounds_of(state_dir) if r.state == "failed"]),
        committed_after_recovery=True,
        recorded=time.time(),
    )


def test_disk_that_stays_full_ends_the_run_as_failed_with_the_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With max_retries_on_failed_round=1 and a disk that never frees up, round 1 fails twice
    and the run ends 'failed' naming the cause; round 0 (the initial model) stays intact and
    clients are told DONE instead of hanging."""
    state_dir = tmp_path / "state"
    original = atomic_files.write_atomic

    def write(path: Path, data: Any, mode: int = 0o644, **kw: Any) -> None:
        if Path(path).name.startswith("global-") and not Path(path).name.startswith(
            "global-000000."
        ):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        original(path, data, mode, **kw)

    monkeypatch.setattr(atomic_files, "write_atomic", write)
    options = ServerOptions(
        tick_interval_s=0.05, heartbeat_interval_ms=100, allow_unencrypted_uploads=True
    )
    stop = threading.Event()
    with inprocess_server(
        state_dir, monkeypatch, options, rounds=2, min_clients=2, max_retries_on_failed_round=1
    ) as (server, target):
        initial = checkpoint_digests(state_dir)
        clients = [LightClient(target, f"c{i}", index=i) for i in range(2)]
        threads = [ResilientClientThread(c, stop) for c in clients]
        try:
            for t in threads:
                t.start()
            wait_until(lambda: server.engine.run.state == "failed", 30, "run failed")
            wait_until(lambda: all(t.done for t in threads), 10, "clients told DONE")
        finally:
            stop.set()
            for c in clients:
                c.close()
        run = server.engine.run
    assert run.last_committed_round == 0
    assert os.strerror(errno.ENOSPC) in run.message, run.message
    assert [r.state for r in rounds_of(state_dir)] == ["failed", "failed"]
    assert checkpoint_digests(state_dir) == initial
    assert not [e for t in threads for e in t.errors]
    record_result(
        "disk_full_stays_full",
        run_state=run.state,
        failed_attempts=2,
        initial_checkpoint_intact=True,
        clients_told_done=len(threads),
    )
