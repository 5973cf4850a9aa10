"""`crossfed server start` with named crash points, for the fault-injection suite.

Run as a script with the usual `crossfed server start` flags. The server code carries no test
hook: this launcher wraps server functions before the CLI runs and, at the Nth time the
process reaches the point named by ``CROSSFED_FAULT_AT``, writes the point name to
``CROSSFED_FAULT_MARKER`` (so the test knows where it died) and SIGKILLs itself, which is
indistinguishable from an external ``kill -9`` at that instant. Unset, nothing is wrapped.

``CROSSFED_TEST_STANDIN=1`` swaps the paper network for the seeded stand-in model of
tests/support/standin_model.py (same round logic, no diffusers import: process start-up drops
from ~8 s to ~3 s). Run it as a module (``python -m tests.support.reliability.fault_injecting_server``)
with the repository root on PYTHONPATH.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FAULT_ENV = "CROSSFED_FAULT_AT"
HIT_ENV = "CROSSFED_FAULT_HIT"
MARKER_ENV = "CROSSFED_FAULT_MARKER"
STANDIN_ENV = "CROSSFED_TEST_STANDIN"

#: Crash points and where they sit in the server's work (names used by the tests).
FAULT_POINTS: dict[str, str] = {
    "register": "a Register call was persisted, before the answer goes out",
    "upload_chunk": "an upload stream is half received (after its 2nd chunk)",
    "fold": "an update is folded into the running sum and its upload row is in the DB",
    "commit_average": "a round is being committed: the average is being computed",
    "checkpoint_write": "the new checkpoint's temp file is half written (before fsync/rename)",
    "checkpoint_renamed": "the new checkpoint is on disk, the DB commit has not happened",
    "prototypes_write": "the checkpoint is on disk, the prototypes file is about to be written",
    "db_commit": "checkpoint and prototypes are on disk, the DB transaction is about to run",
}

_lock = threading.Lock()
_hits = 0


def _crash_if_due(point: str) -> None:
    """SIGKILL this process at the configured hit of the configured point."""
    global _hits
    if os.environ.get(FAULT_ENV) != point:
        return
    with _lock:
        _hits += 1
        due = _hits == int(os.environ.get(HIT_ENV, "1"))
    if due:
        marker = os.environ.get(MARKER_ENV)
        if marker:
            Path(marker).write_text(point)
        sys.stderr.write(f"fault_injecting_server: SIGKILL at {point}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _is_round_checkpoint(path: Path) -> bool:
    return path.name.startswith("global-") and not path.name.startswith("global-000000.")


def install_faults() -> None:
    """Wrap the server functions that host the crash points (only the configured one fires)."""
    import crossfed.server.coordinator_servicer as servicer
    from crossfed.common import atomic_files
    from crossfed.server.aggregation import StreamingFedAvg
    from crossfed.server.round_engine import RoundEngine
    from crossfed.server.state.sqlite import SqliteStateStore

    point = os.environ.get(FAULT_ENV, "")
    if not point:
        return
    if point not in FAULT_POINTS:
        raise SystemExit(f"{FAULT_ENV}={point!r} is not one of {sorted(FAULT_POINTS)}")

    original_register = RoundEngine.register

    def register(self: RoundEngine, *args: Any, **kwargs: Any) -> Any:
        result = original_register(self, *args, **kwargs)
        _crash_if_due("register")
        return result

    original_receive = servicer.receive_payload

    def receive_payload(header: Any, messages: Iterator[Any], *args: Any) -> Any:
        def counted() -> Iterator[Any]:
            for index, message in enumerate(messages):
                if index == 2:
                    _crash_if_due("upload_chunk")
                yield message

        return original_receive(header, counted(), *args)

    original_add = StreamingFedAvg.add

    def add(self: StreamingFedAvg, update: Any, weights: Any, *args: Any, **kwargs: Any) -> None:
        original_add(self, update, weights, *args, **kwargs)
        _crash_if_due("fold")

    original_result = StreamingFedAvg.result

    def result(self: StreamingFedAvg) -> Any:
        _crash_if_due("commit_average")
        return original_result(self)

    # every file the server replaces goes through atomic_files.write_atomic
    original_write: Callable[..., None] = atomic_files.write_atomic

    def write_atomic(path: Path, data: Any, mode: int = 0o644, **kw: Any) -> None:
        path = Path(path)
        if _is_round_checkpoint(path) and os.environ.get(FAULT_ENV) == "checkpoint_write":
            blob = data if isinstance(data, bytes) else b"".join(bytes(p) for p in data)
            tmp = atomic_files.temp_path_for(path)
            with open(tmp, "wb") as handle:  # the real writer's temp name, half the bytes
                handle.write(blob[: len(blob) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            _crash_if_due("checkpoint_write")
            data = blob
        if path.name.startswith("prototypes-"):
            _crash_if_due("prototypes_write")
        original_write(path, data, mode, **kw)
        if _is_round_checkpoint(path):
            _crash_if_due("checkpoint_renamed")

    original_commit = SqliteStateStore.commit_round

    def commit_round(self: SqliteStateStore, record: Any, run: Any) -> None:
        _crash_if_due("db_commit")
        original_commit(self, record, run)

    RoundEngine.register = register  # type: ignore[method-assign]
    servicer.receive_payload = receive_payload
    StreamingFedAvg.add = add  # type: ignore[method-assign]
    StreamingFedAvg.result = result  # type: ignore[method-assign]
    atomic_files.write_atomic = write_atomic  # type: ignore[assignment]
    SqliteStateStore.commit_round = commit_round  # type: ignore[method-assign]


def install_standin_model() -> None:
    """Use the seeded stand-in model instead of the paper network, so the many server starts
    of this suite do not each import diffusers."""
    if os.environ.get(STANDIN_ENV) != "1":
        return
    from crossfed.server import server_app

    from tests.support.standin_model import standin_model

    server_app.build_initial_model = standin_model  # type: ignore[assignment]


def main() -> None:
    """Install the configured fault, then run `crossfed server start ARGS...`."""
    install_standin_model()
    install_faults()
    from crossfed.cli import main as crossfed_main

    sys.argv = ["crossfed", "server", "start", *sys.argv[1:]]
    crossfed_main()


if __name__ == "__main__":
    main()
