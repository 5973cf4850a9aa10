"""`crossfed admin watch`: the rich progress view follows round/upload/commit events, and a
following watch ends by itself when the run stops (live stream from a real server)."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

from crossfed.v1 import admin_pb2
from rich.console import Console
from typer.testing import CliRunner

from crossfed.admin_cli import WatchView
from crossfed.cli import app
from tests.support.admin_server_fixtures import running_server


def _event(kind: str, round_no: int = 0, message: str = "", **values: float) -> admin_pb2.Event:
    return admin_pb2.Event(
        event_id=1, time_unix_s=1.0, kind=kind, round=round_no, message=message, values=values
    )


def test_watch_view_tracks_rounds_uploads_and_accuracy() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with WatchView(console, total_rounds=3, committed=0, enabled=True) as view:
        rounds_task = view.progress.tasks[0]
        uploads_task = view.progress.tasks[1]
        view.apply(_event("round_started", 1, selected=4.0, attempt=1.0))
        assert (uploads_task.total, uploads_task.completed, uploads_task.visible) == (4, 0, True)
        for _ in range(3):
            view.apply(_event("upload_accepted", 1, num_samples=5.0))
        assert uploads_task.completed == 3
        view.apply(_event("round_committed", 1, received=3.0, acc_both=0.75, loss=1.5))
        assert rounds_task.completed == 1 and "acc_both=0.75" in rounds_task.description
        assert "loss" not in rounds_task.description and not uploads_task.visible
        view.apply(_event("policy_updated", 1, "total_rounds=7 min_clients=2"))
        assert rounds_task.total == 7
    text = out.getvalue()
    assert "round_committed" in text and "upload_accepted" in text


def test_following_watch_ends_when_the_run_stops(tmp_path: Path) -> None:
    with running_server(tmp_path) as ts:
        timer = threading.Timer(1.0, lambda: ts.server.engine.stop("test over"))
        timer.start()
        try:
            result = CliRunner().invoke(app, ["admin", *ts.cli_args(), "watch", "--json"])
        finally:
            timer.cancel()
        assert result.exit_code == 0, result.stderr
        events = [json.loads(line) for line in result.stdout.splitlines()]
        assert events[-1]["kind"] == "run_stopped" and events[-1]["message"] == "test over"
        assert events[0]["kind"] == "run_created"
