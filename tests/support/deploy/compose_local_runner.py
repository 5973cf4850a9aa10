"""Run compose services as local processes (no Docker engine): each service's entrypoint +
command and environment, with service hostnames mapped to 127.0.0.1, container ports to free
local ports, volume mount targets to temporary directories and the image's ENV/WORKDIR taken
from deploy/Dockerfile. depends_on conditions (service_completed_successfully,
service_healthy via the service's own healthcheck, service_started) are honoured."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.deploy.compose_project import (
    healthcheck_argv,
    parse_duration_s,
    service_argv,
    volume_target,
)
from tests.support.ports import free_port

VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class ImageSpec:
    """What the runtime stage of the Dockerfile gives every container."""

    env: dict[str, str]
    workdir: str
    cmd: list[str]
    user: str


def parse_dockerfile(path: Path) -> ImageSpec:
    """ENV / WORKDIR / CMD / USER of the last stage (line continuations joined)."""
    text = re.sub(r"\\\n", " ", path.read_text("utf-8"))
    stage: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.upper().startswith("FROM "):
            stage = []
        if stripped and not stripped.startswith("#"):
            stage.append(stripped)
    env: dict[str, str] = {}
    workdir, cmd, user = "/", ["sh"], "root"
    for line in stage:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ENV":
            for token in shlex.split(rest):
                key, sep, value = token.partition("=")
                if sep:
                    env[key] = value
        elif keyword == "WORKDIR":
            workdir = rest.strip()
        elif keyword == "CMD":
            cmd = json.loads(rest)
        elif keyword == "USER":
            user = rest.strip()
    return ImageSpec(env=env, workdir=workdir, cmd=cmd, user=user)


@dataclass
class LocalProcess:
    """A started service process and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text("utf-8", errors="replace")


@dataclass(frozen=True)
class LocalCommand:
    """One service's argv/env/cwd after translation to this machine."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path


@dataclass
class LocalComposeRunner:
    """Translate and run the services of a loaded compose project under ``root``."""

    project: Mapping[str, Any]
    image: ImageSpec
    root: Path
    ports: dict[tuple[str, int], int] = field(default_factory=dict)
    processes: dict[str, LocalProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, service in self.services.items():
            for port in [*service.get("ports", []), *service.get("expose", [])]:
                container_port = int(str(port).rsplit(":", 1)[-1].split("/")[0])
                self.ports[(name, container_port)] = free_port()
        (self.root / "logs").mkdir(parents=True, exist_ok=True)

    @property
    def services(self) -> dict[str, dict[str, Any]]:
        return dict(self.project["services"])

    # -- translation -------------------------------------------------------------------------
    def mounts(self, name: str) -> dict[str, Path]:
        """Container path -> local directory for every volume of service ``name``."""
        out: dict[str, Path] = {}
        for entry in self.services[name].get("volumes", []):
            target = volume_target(entry)
            source = entry.get("source") if isinstance(entry, dict) else str(entry).split(":")[0]
            if source is None or source == target:
                local = self.root / "anonymous" / name / target.strip("/").replace("/", "_")
            elif source.startswith((".", "/", "~")):
                local = self.root / "binds" / source.strip("./~").replace("/", "_")
            else:
                local = self.root / "volumes" / source
            local.mkdir(parents=True, exist_ok=True)
            out[target] = local
        return out

    def _path_map(self, name: str) -> list[tuple[str, str]]:
        pairs = [(t, str(p)) for t, p in self.mounts(name).items()]
        home = self.root / "home" / name
        home.mkdir(parents=True, exist_ok=True)
        pairs += [("/home/crossfed", str(home)), ("/opt/crossfed/bin", str(VENV_BIN))]
        return sorted(pairs, key=lambda pair: -len(pair[0]))

    def translate(self, name: str, value: str) -> str:
        """Rewrite container paths, service hostnames and container ports in one string."""
        for target, local in self._path_map(name):
            pattern = rf"(?<![\w.-]){re.escape(target)}(?=/|$|[\s:,;=])"
            value = re.sub(pattern, local.replace("\\", "\\\\"), value)
        for (service, cport), lport in self.ports.items():
            hosts = [re.escape(service)]
            if service == name:
                hosts += [r"0\.0\.0\.0", r"127\.0\.0\.1", "localhost", r"\[::\]"]
            value = re.sub(
                rf"(?<![\w.-])(?:{'|'.join(hosts)}):{cport}(?!\d)", f"127.0.0.1:{lport}", value
            )
        return value

    def _program(self, argv: list[str]) -> list[str]:
        if argv and argv[0] in ("python", "python3"):
            return [sys.executable, *argv[1:]]
        if argv and (VENV_BIN / argv[0]).exists():
            return [str(VENV_BIN / argv[0]), *argv[1:]]
        return argv

    def command(self, name: str, argv: list[str] | None = None) -> LocalCommand:
        """The local equivalent of running ``argv`` (default: the service's) in the container."""
        service = self.services[name]
        raw = argv if argv is not None else service_argv(service, self.image.cmd)
        env = {
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "TMPDIR": str(self.root / "tmp"),
        }
        (self.root / "tmp").mkdir(exist_ok=True)
        for key, value in self.image.env.items():
            if key != "PATH":
                env[key] = self.translate(name, value)
        for key, value in (service.get("environment") or {}).items():
            if value is not None:
                env[key] = self.translate(name, str(value))
        workdir = service.get("working_dir", self.image.workdir)
        cwd = Path(self.translate(name, workdir))
        if not cwd.is_absolute() or not str(cwd).startswith(str(self.root)):
            cwd = self.root / "workdir" / name
        cwd.mkdir(parents=True, exist_ok=True)
        return LocalCommand(
            argv=self._program([self.translate(name, a) for a in raw]), env=env, cwd=cwd
        )

    # -- running -----------------------------------------------------------------------------
    def start(self, name: str, argv: list[str] | None = None) -> LocalProcess:
        """Start a service (or ``argv`` in its environment) in the background."""
        cmd = self.command(name, argv)
        log_path = self.root / "logs" / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                cmd.argv,
                env=cmd.env,
                cwd=cmd.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = LocalProcess(name, popen, log_path)
        self.processes[name] = process
        return process

    def run(
        self, name: str, argv: list[str] | None = None, timeout_s: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run to completion (a one-shot job or `docker compose run` of a tool)."""
        cmd = self.command(name, argv)
        return subprocess.run(
            cmd.argv,
            env=cmd.env,
            cwd=cmd.cwd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def healthy(self, name: str) -> bool:
        """One run of the service's healthcheck command."""
        probe = healthcheck_argv(self.services[name])
        if probe is None:
            raise AssertionError(f"service {name} has no healthcheck")
        check = self.services[name]["healthcheck"]
        timeout = parse_duration_s(check.get("timeout", "30s"))
        try:
            return self.run(name, probe, timeout_s=timeout + 10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def wait_healthy(self, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            process = self.processes.get(name)
            if process is not None and process.popen.poll() is not None:
                raise AssertionError(
                    f"{name} exited ({process.popen.returncode}) before healthy:"
                    f"\n{process.output()[-3000:]}"
                )
            if self.healthy(name):
                return
            time.sleep(0.5)
        raise AssertionError(f"{name} not healthy after {timeout_s:.0f} s")

    def wait_exit(self, name: str, timeout_s: float) -> int:
        process = self.processes[name]
        try:
            return process.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{name} still running after {timeout_s:.0f} s:\n{process.output()[-3000:]}"
            ) from None

    def up(self, timeout_s: float = 180.0) -> list[str]:
        """`docker compose up`: start services without profiles in dependency order."""
        pending = [n for n, s in self.services.items() if not s.get("profiles")]
        started: list[str] = []
        deadline = time.monotonic() + timeout_s
        while pending:
            progressed = False
            for name in list(pending):
                deps = self.services[name].get("depends_on") or {}
                if all(d in started for d in deps):
                    for dep, spec in deps.items():
                        condition = spec.get("condition", "service_started")
                        left = max(1.0, deadline - time.monotonic())
                        if condition == "service_completed_successfully":
                            code = self.wait_exit(dep, left)
                            if code != 0:
                                raise AssertionError(
                                    f"{dep} exited {code}:\n{self.processes[dep].output()[-3000:]}"
                                )
                        elif condition == "service_healthy":
                            self.wait_healthy(dep, left)
                    self.start(name)
                    started.append(name)
                    pending.remove(name)
                    progressed = True
            if not progressed:
                raise AssertionError(f"dependency cycle or unknown dependency among {pending}")
        return started

    def stop_all(self, grace_s: float = 15.0) -> None:
        """SIGTERM every running process group, SIGKILL what is left after ``grace_s``."""
        for process in self.processes.values():
            if process.popen.poll() is None:
                os.killpg(process.popen.pid, signal.SIGTERM)
        end = time.monotonic() + grace_s
        for process in self.processes.values():
            try:
                process.popen.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.popen.pid, signal.SIGKILL)
                process.popen.wait()
