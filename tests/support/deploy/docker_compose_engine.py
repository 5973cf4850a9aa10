"""The compose deployment on a real Docker engine (brought up by deploy/local-docker.sh): compose
commands under the test's own project name and environment, container state and logs, waits,
crash injection and the containers' cgroup memory.

A crash is SIGKILL of the container's main process from the host (what the OOM killer or a
segfault does): Docker then applies the restart policy. `docker kill` would not do: Docker
counts it as a manual stop and never restarts the container after it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.support.deploy.deploy_paths import REPO

LOCAL_DOCKER = REPO / "deploy" / "local-docker.sh"

#: Admin tool run inside the server container (its own credential, loopback TLS): quicker than a
#: `compose run admin` container for polling while a run is in progress.
SERVER_ADMIN = [
    "crossfed", "admin", "--server", "127.0.0.1:50051",
    "--certs-dir", "/var/lib/crossfed/kit/tls",
    "--credential", "/var/lib/crossfed/state/admin.credential.json", "--json",
]  # fmt: skip

T = TypeVar("T")


class DockerSetupError(Exception):
    """deploy/local-docker.sh failed; the message is its last line."""


def local_docker(*args: str, timeout_s: float = 1800) -> str:
    """Run deploy/local-docker.sh; its output, or DockerSetupError with the failing step."""
    result = subprocess.run(
        [str(LOCAL_DOCKER), *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        lines = [line for line in output.splitlines() if line.strip()]
        raise DockerSetupError(lines[-1] if lines else f"exit {result.returncode}, no output")
    return output


def wait_until(
    what: str, probe: Callable[[], T | None], timeout_s: float, every_s: float = 1.0
) -> T:
    """Poll ``probe`` until it returns something other than None (or fail naming ``what``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def docker(
    *args: str, timeout_s: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {result.stderr.strip()[-2000:]}")
    return result


@dataclass
class ComposeProject:
    """One compose project of the repository's docker-compose.yml under its own name."""

    name: str
    env: dict[str, str]
    files: list[Path]

    def compose(
        self, *args: str, timeout_s: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        files = [arg for path in self.files for arg in ("-f", str(path))]
        result = subprocess.run(
            ["docker", "compose", "-p", self.name, *files, *args],
            capture_output=True, text=True, timeout=timeout_s, check=False, cwd=REPO,
            env={**os.environ, **self.env},
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker compose {' '.join(args)} exited {result.returncode}:\n"
                f"{(result.stdout + result.stderr)[-3000:]}"
            )
        return result

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-a", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: expected one container, found {ids}"
        return ids[0]

    def inspect(self, service: str) -> dict[str, Any]:
        return dict(json.loads(docker("inspect", self.container(service)).stdout)[0])

    def logs(self, service: str) -> str:
        result = docker("logs", self.container(service), check=False)
        return result.stdout + result.stderr

    def round_lines(self, service: str, round_no: int) -> int:
        """How many "round N ..." lines a client daemon printed for round ``round_no``."""
        pattern = re.compile(rf"^round\s+{round_no}\s", re.MULTILINE)
        return len(pattern.findall(self.logs(service)))

    def wait_round_line(self, service: str, round_no: int, timeout_s: float) -> None:
        wait_until(
            f"{service} to report round {round_no}",
            lambda: True if self.round_lines(service, round_no) else None,
            timeout_s,
        )

    def wait_exited(self, service: str, timeout_s: float) -> int:
        """Exit code once the container has stopped for good (a restart policy may bring a
        crashed one back first)."""

        def probe() -> int | None:
            state = self.inspect(service)["State"]
            if state["Status"] == "exited" and not state["Restarting"]:
                return int(state["ExitCode"])
            return None

        return wait_until(f"{service} to exit", probe, timeout_s)

    def server_admin(self, *args: str) -> Any:
        """``crossfed admin --json ARGS`` inside the server container; None while it is down."""
        result = self.compose(
            "exec", "-T", "server", *SERVER_ADMIN, *args, check=False, timeout_s=60
        )
        if result.returncode != 0:
            return None
        return json.loads(result.stdout)

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The operator's command: ``docker compose run --rm admin ARGS``."""
        return self.compose("run", "--rm", "admin", *args, timeout_s=180)

    def crash(self, service: str) -> None:
        """SIGKILL the container's main process from the host: a crash, not a manual stop."""
        pid = int(self.inspect(service)["State"]["Pid"])
        assert pid > 0, f"{service} is not running"
        os.kill(pid, signal.SIGKILL)

    def copy_out(self, service: str, path: str, dest: Path) -> Path:
        docker("cp", f"{self.container(service)}:{path}", str(dest))
        return dest

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False)

    @contextmanager
    def explain_failure(self) -> Iterator[None]:
        """An assertion failing inside carries the last lines of every service's log."""
        try:
            yield
        except AssertionError as exc:
            logs = self.compose("logs", "--no-color", "--tail", "40", check=False).stdout
            raise AssertionError(f"{exc}\n--- {self.name} logs (tail) ---\n{logs[-8000:]}") from exc


def cgroup_memory_files(container_id: str) -> tuple[Path, Path] | None:
    """(peak usage file, memory.stat) of a running container, for cgroup v1 or v2 layouts."""
    candidates = [
        Path("/sys/fs/cgroup/memory/docker") / container_id / "memory.max_usage_in_bytes",
        Path("/sys/fs/cgroup/docker") / container_id / "memory.peak",
        Path("/sys/fs/cgroup/system.slice") / f"docker-{container_id}.scope" / "memory.peak",
    ]
    for peak in candidates:
        if peak.exists():
            return peak, peak.with_name("memory.stat")
    return None


@dataclass
class MemoryReading:
    """Highest cgroup readings of one container: usage peak (kernel high-water mark, page cache
    included) and anonymous memory (RSS-like; sampled)."""

    peak_bytes: int = 0
    anon_bytes: int = 0
    samples: int = 0


def _anon_bytes(stat: Path) -> int:
    values = dict(line.split() for line in stat.read_text().splitlines() if line.count(" ") == 1)
    return int(values.get("total_rss", values.get("anon", 0)))


@dataclass
class CgroupMemorySampler:
    """Reads the containers' cgroup memory files every ``every_s`` until stopped."""

    containers: dict[str, str]
    every_s: float = 0.5
    readings: dict[str, MemoryReading] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> CgroupMemorySampler:
        self.readings = {name: MemoryReading() for name in self.containers}
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            for name, container_id in self.containers.items():
                files = cgroup_memory_files(container_id)
                if files is None:
                    continue
                try:
                    peak, anon = int(files[0].read_text()), _anon_bytes(files[1])
                except (OSError, ValueError):
                    continue  # the container exited between the check and the read
                reading = self.readings[name]
                reading.peak_bytes = max(reading.peak_bytes, peak)
                reading.anon_bytes = max(reading.anon_bytes, anon)
                reading.samples += 1
            self._stop.wait(self.every_s)

    def stop(self) -> dict[str, MemoryReading]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return self.readings
