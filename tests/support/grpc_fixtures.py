"""In-process coordination server on 127.0.0.1 for gRPC tests (small model, insecure mode),
and the real `crossfed server` as a child process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crossfed.common.config import ServerConfig
from crossfed.server.server_app import CoordinatorServer, ServerOptions

from tests.support.ports import free_port
from tests.support.small_model import SMALL_MODEL


def small_config(
    state_dir: Path, sections: dict[str, Any] | None = None, **rounds: Any
) -> ServerConfig:
    """A small-model insecure ServerConfig; ``sections`` replaces whole top-level sections."""
    policy = {"rounds": 2, "min_clients": 2, "round_deadline_s": 30.0}
    policy.update(rounds)
    return ServerConfig.model_validate(
        {
            "listen": f"127.0.0.1:{free_port()}",
            "state_dir": str(state_dir),
            "model": SMALL_MODEL,
            "rounds": policy,
            "tls": {"insecure": True},
            "transport": {"chunk_size": 64 * 1024, "max_message_bytes": 1024 * 1024},
            # scripted clients send constant offsets and check the exact eq.-15 average;
            # the update bound (which would clip them) has its own tests
            "update_bound": {"max_norm_ratio": None},
            **(sections or {}),
        }
    )


@contextmanager
def running_server(
    state_dir: Path,
    options: ServerOptions | None = None,
    sections: dict[str, Any] | None = None,
    **rounds: Any,
) -> Iterator[tuple[CoordinatorServer, str]]:
    cfg = small_config(state_dir, sections, **rounds)
    server = CoordinatorServer.create(cfg, options or ServerOptions(tick_interval_s=0.05))
    port = server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        server.stop()


def start_server_process(
    state_dir: Path, config: Path, port: int, log: Path
) -> subprocess.Popen[bytes]:
    """`crossfed server start` as a child process (insecure, small heartbeats), output to ``log``."""
    cmd = [
        sys.executable, "-m", "crossfed", "server", "start",
        "--config", str(config), "--state-dir", str(state_dir),
        "--listen", f"127.0.0.1:{port}", "--insecure", "--allow-unencrypted-uploads",
        "--heartbeat-ms", "100", "--client-timeout-s", "20", "--exit-when-done", "--done-linger-s", "1",
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT)
