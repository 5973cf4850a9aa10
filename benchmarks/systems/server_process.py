"""Run `crossfed server start` as a subprocess (its own GIL, its own memory accounting) and
read its resident memory from /proc/<pid>/status, no psutil needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from systems.loopback_ports import free_port
from systems.measurement_records import BenchmarkError


def crossfed_command() -> list[str]:
    """The `crossfed` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("crossfed")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from crossfed.cli import main; main()"]


def read_status_kib(pid: int, field: str) -> int:
    """A ``VmRSS``/``VmHWM``-style field of /proc/<pid>/status in KiB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        raise BenchmarkError(f"cannot read /proc/{pid}/status: {exc}") from exc
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchmarkError(f"/proc/{pid}/status has no {field} line (not Linux?)")


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False where not permitted."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class ServerProcess:
    """A started server subprocess; ``target`` is its host:port."""

    process: subprocess.Popen[bytes]
    target: str
    state_dir: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kib(self) -> int:
        return read_status_kib(self.pid, "VmRSS")

    def peak_kib(self) -> int:
        return read_status_kib(self.pid, "VmHWM")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (graceful shutdown), SIGKILL if it does not exit in time."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def start_server_process(
    work: Path,
    config: dict[str, Any],
    flags: list[str],
    startup_timeout_s: float = 180.0,
) -> ServerProcess:
    """Write ``config`` as YAML, start the server with ``flags`` and wait for its port file."""
    work.mkdir(parents=True, exist_ok=True)
    state_dir = work / "state"
    port = free_port()
    config_path = work / "server.yaml"
    full = {**config, "listen": f"127.0.0.1:{port}", "state_dir": str(state_dir)}
    config_path.write_text(yaml.safe_dump(full))
    port_file = work / "port"
    log_path = work / "server.log"
    command = [
        *crossfed_command(),
        "server",
        "start",
        "--config",
        str(config_path),
        "--port-file",
        str(port_file),
        "--log-level",
        "WARNING",
        *flags,
    ]
    return launch_with_port_file(
        command, port_file, log_path, state_dir, startup_timeout_s, f"127.0.0.1:{port}"
    )


def launch_with_port_file(
    command: list[str],
    port_file: Path,
    log_path: Path,
    state_dir: Path,
    startup_timeout_s: float,
    target: str | None = None,
) -> ServerProcess:
    """Start ``command`` (output to ``log_path``) and wait until it writes ``port_file``;
    ``target`` defaults to 127.0.0.1 and the port written there."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(process, target or "", state_dir, log_path)
    deadline = time.monotonic() + startup_timeout_s
    while not (port_file.is_file() and port_file.read_text().strip()):
        if not server.alive():
            raise BenchmarkError(
                f"server exited with {process.returncode} during startup:\n{server.log_tail()}"
            )
        if time.monotonic() > deadline:
            server.stop()
            raise BenchmarkError(f"server did not start in {startup_timeout_s:g} s")
        time.sleep(0.05)
    if target is None:
        server.target = f"127.0.0.1:{port_file.read_text().strip()}"
    return server
