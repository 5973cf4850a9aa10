"""In-process coordination server on 127.0.0.1 for gRPC tests (small model, insecure mode)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crossfed.common.config import ServerConfig
from crossfed.server.server_app import CoordinatorServer, ServerOptions

SMALL_MODEL = {"text_dim": 16, "image_dim": 8, "hidden_dim": 16, "num_classes": 3}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
