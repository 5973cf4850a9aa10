"""Atomic file writes: the one way crossfed replaces a file. Data goes to a temporary file in
the same directory (created with its final mode, so a key is never briefly world-readable),
is flushed and fsynced, then renamed over the target, and the directory is fsynced: a crash
at any instant leaves the old file or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal, overload

TEMP_MARKER = ".tmp-"


#: Longest target name whose temporary name embeds it (the suffix must fit NAME_MAX, 255).
_EMBED_NAME_MAX = 200


def temp_path_for(path: Path) -> Path:
    """A fresh temporary name beside ``path`` (hidden, marked, unique per call; short for a
    long target name, so it fits the directory whatever the target's length)."""
    stem = path.name if len(os.fsencode(path.name)) <= _EMBED_NAME_MAX else "crossfed"
    return path.with_name(f".{stem}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@overload
@contextmanager
def atomic_output(
    path: Path,
    mode: int = ...,
    *,
    text: Literal[False] = ...,
    durable: bool = ...,
    before_replace: Callable[[], None] | None = ...,
) -> Iterator[IO[bytes]]: ...


@overload
@contextmanager
def atomic_output(
    path: Path,
    mode: int = ...,
    *,
    text: Literal[True],
    durable: bool = ...,
    before_replace: Callable[[], None] | None = ...,
) -> Iterator[IO[str]]: ...


@contextmanager
def atomic_output(
    path: Path,
    mode: int = 0o644,
    *,
    text: bool = False,
    durable: bool = True,
    before_replace: Callable[[], None] | None = None,
) -> Iterator[IO[bytes]] | Iterator[IO[str]]:
    """A handle on a temporary file that replaces ``path`` when the block ends normally and
    is deleted when it raises. ``durable`` False skips the fsyncs (rebuildable caches);
    ``before_replace`` may refuse (raise) right before the rename (a target that changed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, mode)
    try:
        handle: IO[Any] = (
            os.fdopen(fd, "w", encoding="utf-8", newline="") if text else os.fdopen(fd, "wb")
        )
        with handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # the umask may have changed the creation mode
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if durable:
        fsync_directory(path.parent)


def write_atomic(
    path: Path,
    data: bytes | memoryview | Iterable[bytes | memoryview],
    mode: int = 0o644,
    *,
    durable: bool = True,
) -> None:
    """Replace ``path`` with ``data`` (bytes, or pieces written in order, never joined in
    memory) atomically; see `atomic_output`."""
    pieces = (data,) if isinstance(data, bytes | memoryview) else data
    with atomic_output(path, mode, durable=durable) as handle:
        for piece in pieces:
            handle.write(piece)


def remove_stale_temps(directory: Path, name_prefix: str = "") -> int:
    """Delete temporary files a killed writer left in ``directory`` (those of targets whose
    name starts with ``name_prefix``); returns how many."""
    removed = 0
    for stale in Path(directory).glob(f".{name_prefix}*{TEMP_MARKER}*"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
            removed += 1
    return removed
