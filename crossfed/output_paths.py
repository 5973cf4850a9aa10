"""Where a command may write a file the user named: checked before any byte is fetched, so
every problem is one line (not a traceback after a download), and ``--force`` replaces a
regular file only, never a directory, a device node, a FIFO, a socket or a symlink.

`safe_output_path` checks the target before anything is fetched; `check_replaceable` checks
it again right before common/atomic_files.py renames the finished file over it (pass it as
`atomic_output(..., before_replace=...)`): the target may have changed in the meantime.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class OutputPathError(Exception):
    """The output path cannot be written as asked (one human line)."""


def _name_max(directory: Path) -> int:
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def check_replaceable(path: Path, force: bool) -> None:
    """`OutputPathError` unless ``path`` is absent, or a regular file and ``force``."""
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
    check_replaceable(path, force)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputPathError(f"directory {directory} is not writable by this user")
    return path
