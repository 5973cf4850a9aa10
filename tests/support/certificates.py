"""A test project's certificates: CA, the server's certificate and any client certificates."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from crossfed.common.crypto.certificates import create_ca, issue_certificate


def make_certs(root: Path, clients: Iterable[str] = (), *, server: bool = True) -> Path:
    """Create a CA in ``root`` and issue the server certificate (unless ``server`` is False)
    and one client certificate per name in ``clients``; returns ``root``."""
    create_ca(root)
    if server:
        issue_certificate(root, "server", "server")
    for name in clients:
        issue_certificate(root, "client", name)
    return root
