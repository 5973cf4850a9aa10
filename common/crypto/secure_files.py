"""Atomic, permission-aware file writes for secrets (private keys, credentials) and the
public files beside them, so a crash never leaves a half-written or world-readable key."""

from __future__ import annotations

from pathlib import Path

from crossfed.common import atomic_files

SECRET_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644


class SecureFileError(Exception):
    """A secret file could not be written or has unsafe permissions."""


def write_file_atomic(path: Path, data: bytes, mode: int) -> None:
    """Atomically replace ``path`` with ``data``, created with ``mode`` from the start (never
    briefly 0644 for a key); SecureFileError when the disk refuses."""
    try:
        atomic_files.write_atomic(Path(path), data, mode)
    except OSError as exc:
        raise SecureFileError(f"cannot write {path}: {exc.strerror or exc}") from exc


def write_secret_file(path: Path, data: bytes) -> None:
    """Atomically write a secret readable by its owner only (0600)."""
    write_file_atomic(path, data, SECRET_FILE_MODE)


def write_public_file(path: Path, data: bytes) -> None:
    """Atomically write a non-secret file (certificate) as 0644."""
    write_file_atomic(path, data, PUBLIC_FILE_MODE)


def check_secret_permissions(path: Path) -> None:
    """Refuse a secret file that group or others can read (like ssh does for keys)."""
    try:
        mode = Path(path).stat().st_mode & 0o777
    except FileNotFoundError as exc:
        raise SecureFileError(f"secret file {path} does not exist") from exc
    if mode & 0o077:
        raise SecureFileError(
            f"secret file {path} has mode {mode:o}; it must not be readable by group/others "
            f"(fix with: chmod 600 {path})"
        )
