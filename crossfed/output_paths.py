"""Where a command may write a file the user named: checked before any byte is fetched, so
every problem is one line (not a traceback after a download), and ``--force`` replaces a
regular file only, never a directory, a device node, a FIFO, a socket or a symlink.

`safe_output_path` checks the target; `open_temp_beside` opens the temporary file that is
renamed over it once complete (created exclusively, without following links, with a short
name that fits the directory whatever the target's length); `replace_checked` re-checks the
target right before the rename.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import BinaryIO


class OutputPathError(Exception):
    """The output path cannot be written as asked (one human line)."""


def _name_max(directory: Path) -> int:
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def _check_target(path: Path, force: bool) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputPathError(f"cannot inspect {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(info.st_mode)
            else "a symbolic link"
            if stat.S_ISLNK(info.st_mode)
            else "a device, FIFO or socket"
        )
        raise OutputPathError(f"{path} is {kind}; only a regular file can be replaced")
    if not force:
        raise OutputPathError(f"{path} already exists; pass --force to overwrite it")


def safe_output_path(path: Path, force: bool) -> Path:
    """``path`` if a new regular file can be written there (replacing an existing regular
    file only with ``force``), else `OutputPathError` saying why."""
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        raise OutputPathError(f"{path} names a directory, not a file")
    directory = path.parent
    if not directory.is_dir():
        raise OutputPathError(f"directory {directory} does not exist")
    limit = _name_max(directory)
    if len(os.fsencode(path.name)) > limit:
        raise OutputPathError(
            f"file name is {len(os.fsencode(path.name))} bytes long; this file system allows "
            f"{limit}"
        )
    _check_target(path, force)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputPathError(f"directory {directory} is not writable by this user")
    return path


def open_temp_beside(path: Path) -> tuple[Path, BinaryIO]:
    """A new temporary file in ``path``'s directory, opened for writing (O_EXCL, no links
    followed, 0644)."""
    tmp = path.with_name(f".crossfed-{os.getpid()}-{secrets.token_hex(4)}.part")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(tmp, flags, 0o644)
    except OSError as exc:
        raise OutputPathError(f"cannot write in {path.parent}: {exc.strerror or exc}") from None
    return tmp, os.fdopen(fd, "wb")


def replace_checked(tmp: Path, path: Path, force: bool) -> None:
    """Rename the finished ``tmp`` over ``path`` after checking the target again (it may have
    changed during the download), then fsync the directory."""
    _check_target(path, force)
    try:
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise OutputPathError(f"cannot write {path}: {exc.strerror or exc}") from None
