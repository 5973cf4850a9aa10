"""Open a `StateStore` from a URL or path: ``memory://``, ``sqlite:///abs/path.db``, a
``.db`` file path, or a directory (which gets ``state.db`` inside)."""

from __future__ import annotations

import os
from pathlib import Path

from crossfed.server.errors import ConfigurationError
from crossfed.server.state.base import StateStore
from crossfed.server.state.memory import InMemoryStateStore
from crossfed.server.state.sqlite import SqliteStateStore

STATE_DB_NAME = "state.db"


def prepare_state_dir(path: Path) -> Path:
    """Create the server's state directory (or take an existing one) and check that it is a
    writable directory: every problem is one `ConfigurationError` naming the path."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigurationError(
            f"state directory {path} exists and is not a directory; pass --state-dir with a "
            "directory"
        ) from None
    except OSError as exc:
        raise ConfigurationError(
            f"cannot create the state directory {path}: {exc.strerror or exc}"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigurationError(f"state directory {path} is not writable by this user")
    return path


def open_state_store(location: str | Path) -> StateStore:
    """Pick the implementation from ``location`` (see module docstring)."""
    text = str(location).strip()
    if not text:
        raise ConfigurationError("state store location is empty; give a directory or sqlite:///")
    if text in {"memory://", ":memory:", "memory"}:
        return InMemoryStateStore()
    if text.startswith("sqlite://"):
        path = text[len("sqlite://") :]
        if not path or path == "/":
            raise ConfigurationError(f"state store URL {text!r} has no file path")
        return SqliteStateStore(Path(path))
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise ConfigurationError(
            f"unknown state store scheme {scheme!r} in {text!r}; use memory:// or sqlite:///path"
        )
    file_or_dir = Path(text)
    if file_or_dir.suffix in {".db", ".sqlite", ".sqlite3"}:
        return SqliteStateStore(file_or_dir)
    return SqliteStateStore(file_or_dir / STATE_DB_NAME)
