"""The real `crossfed server start` process with --log-json, --metrics-port and
--no-autostart over TLS, operated by `crossfed admin` with the admin credential it wrote
(start), scraped over HTTP, then stopped with SIGTERM: its log lines are JSON objects and
never contain the admin secret."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crossfed.cli import app
from tests.support.certificates import make_certs
from tests.support.ports import free_port

pytestmark = pytest.mark.integration  # starts real processes


def test_server_process_with_json_logs_metrics_and_admin_start(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    metrics_port = free_port()
    log_file = tmp_path / "server.log"
    certs = tmp_path / "certs"
    make_certs(certs)
    cmd = [
        sys.executable, "-m", "crossfed", "server", "start",
        "--state-dir", str(tmp_path / "state"), "--listen", f"127.0.0.1:{free_port()}",
        "--port-file", str(port_file), "--metrics-port", str(metrics_port), "--log-json",
        "--no-autostart", "--rounds", "2",
    ]  # fmt: skip
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "CROSSFED_TLS__CERT_DIR": str(certs)},
        )
    try:
        deadline = time.monotonic() + 90
        while not port_file.exists() or not port_file.read_text():
            assert proc.poll() is None, log_file.read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        target = f"127.0.0.1:{port_file.read_text().strip()}"
        runner = CliRunner()
        credential = tmp_path / "state" / "admin.credential.json"
        conn = ["admin", "--server", target, "--certs-dir", str(certs)]
        conn += ["--credential", str(credential)]
        status = runner.invoke(app, [*conn, "status", "--json"])
        assert status.exit_code == 0, status.stderr
        assert json.loads(status.stdout)["run_state"] == "idle"
        started = runner.invoke(app, [*conn, "start", "--min-clients", "1"])
        assert started.exit_code == 0 and "run running" in started.stdout
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        assert 'crossfed_run_state{state="running"} 1.0' in text
        assert "crossfed_grpc_handled_total" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    records = []
    for line in log_file.read_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
        else:  # the CLI's own one-line banners (listening on / stopped), not log records
            assert line.startswith("crossfed server"), line
    loggers = {r["logger"] for r in records}
    assert "crossfed.server.admin_servicer" in loggers
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any("start run" in str(r["message"]) for r in records)
    secret = json.loads(credential.read_text())["secret"]
    assert secret not in log_file.read_text()
