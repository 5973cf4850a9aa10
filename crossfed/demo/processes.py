"""Child processes of `crossfed demo`: start each in its own process group with its log in
the run folder, notice when one dies, and stop every one of them on exit (Ctrl-C included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


class DemoProcessError(RuntimeError):
    """A child process of the demo failed; the message names it and points at its log."""


@dataclass
class ChildProcess:
    """One started child: its name, process handle and log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def tail(self, lines: int = 15) -> str:
        """Last lines of the child's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class ProcessSupervisor:
    """Starts `python -m crossfed ...` children and guarantees they are gone afterwards."""

    log_dir: Path
    children: list[ChildProcess] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> ChildProcess:
        """Start `crossfed ARGS` as a child in a new session (so a signal reaches its group)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed in stop_all
        child_env = {**os.environ, **(env or {})}
        process = subprocess.Popen(
            [sys.executable, "-m", "crossfed", *args],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=child_env,
            start_new_session=True,
        )
        child = ChildProcess(name, process, log_path, log_file)
        self.children.append(child)
        with open(self.log_dir / "pids.txt", "a") as pids:  # lets a test prove cleanup
            pids.write(f"{name} {process.pid}\n")
        return child

    def check_alive(self, names: set[str] | None = None) -> None:
        """Raise DemoProcessError if a (named) child exited with a failure."""
        for child in self.children:
            if names is not None and child.name not in names:
                continue
            code = child.process.poll()
            if code not in (None, 0):
                raise DemoProcessError(
                    f"{child.name} exited with code {code}; log {child.log_path}:\n{child.tail()}"
                )

    def wait_all(self, names: set[str], timeout_s: float) -> None:
        """Wait for the named children to exit on their own."""
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            if child.name in names:
                remaining = max(0.1, deadline - time.monotonic())
                try:
                    child.process.wait(timeout=remaining)
                except subprocess.TimeoutExpired:
                    return

    def stop_all(self, grace_s: float = 5.0) -> None:
        """SIGTERM every live child's group, then SIGKILL what is left after grace_s."""
        for child in self.children:
            if child.process.poll() is None:
                _signal_group(child.process, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            try:
                child.process.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(child.process, signal.SIGKILL)
                child.process.wait(timeout=5)
            child.log_file.close()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
