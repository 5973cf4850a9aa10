"""A real multi-node Ray cluster on this machine: a head node (`ray start --head`) and more
nodes joining it (`ray start --address=...`), each its own set of processes, with token
authentication and a private temp dir.

Teardown never uses `ray stop` (it kills every Ray process of the user on the machine,
other people's clusters included): every process the cluster started carries a marker
variable in its environment, and exactly those processes are signalled, by pid."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.ports import free_port

_ADDRESS = re.compile(r"ray start --address='([^']+)'")
RAY = str(Path(sys.executable).with_name("ray"))


@dataclass(frozen=True)
class LocalCluster:
    """Where to reach the cluster and the environment a driver needs to join it."""

    address: str
    env: dict[str, str]
    nodes: int
    marker: str


def _wait_for(path: Path, pattern: re.Pattern[str] | str, proc: subprocess.Popen[bytes]) -> str:
    """The first match of ``pattern`` in the log ``path`` (the process writes it as it
    starts); fails if the process exits first or nothing shows within two minutes."""
    deadline = time.monotonic() + 120
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        found = regex.search(text)
        if found:
            return found.group(found.lastindex or 0)
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"no {regex.pattern!r} in {path} within 120 s")


def processes_with(marker: str) -> list[int]:
    """Pids of live processes whose environment holds ``marker`` (the cluster's)."""
    needle = marker.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def _stop(marker: str, procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM the `ray start --block` processes (they stop their nodes), then SIGKILL
    whatever process of this cluster is still there."""
    for proc in reversed(procs):  # joining nodes first, then the head
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for _ in range(3):
        left = processes_with(marker)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def local_ray_cluster(
    nodes: int = 2, cpus_per_node: int = 1, object_store_mb: int = 100
) -> Iterator[LocalCluster]:
    """Start a head and ``nodes - 1`` joining nodes; stop every process of theirs on exit,
    whatever happened inside."""
    marker = f"CROSSFED_TEST_CLUSTER={secrets.token_hex(8)}"
    temp = Path(tempfile.mkdtemp(prefix="cf-cluster-"))  # short: socket paths <= 107 bytes
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    node_env = {**env, marker.split("=")[0]: marker.split("=")[1]}
    common = [
        "--block",
        f"--num-cpus={cpus_per_node}",
        f"--object-store-memory={object_store_mb * 2**20}",
        "--disable-usage-stats",
    ]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        head_log = temp / "head.log"
        with head_log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [
                        RAY,
                        "start",
                        "--head",
                        f"--port={free_port()}",
                        f"--temp-dir={temp}",
                        "--include-dashboard=false",
                        *common,
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=node_env,
                    start_new_session=True,
                )
            )
        address = _wait_for(head_log, _ADDRESS, procs[0])
        for i in range(1, nodes):
            log = temp / f"node{i}.log"
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [RAY, "start", f"--address={address}", *common],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=node_env,
                        start_new_session=True,
                    )
                )
            _wait_for(log, "Ray runtime started", procs[-1])
        driver_env = {k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        yield LocalCluster(address, driver_env, nodes, marker)
    finally:
        _stop(marker, procs)
        shutil.rmtree(temp, ignore_errors=True)
