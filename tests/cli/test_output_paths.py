"""Where a command may write a user-named file: a new or (with force) an existing regular
file; never a directory, a symlink or a special file; a name that fits; a temp file beside it
that is renamed over the target only after the target is checked again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.atomic_files import atomic_output
from crossfed.output_paths import OutputPathError, check_replaceable, safe_output_path


def test_regular_files_only_and_force_to_replace(tmp_path: Path) -> None:
    new = tmp_path / "model.safetensors"
    assert safe_output_path(new, force=False) == new
    new.write_bytes(b"old")
    with pytest.raises(OutputPathError, match="--force"):
        safe_output_path(new, force=False)
    assert safe_output_path(new, force=True) == new
    link = tmp_path / "link"
    link.symlink_to(new)
    with pytest.raises(OutputPathError, match="symbolic link"):
        safe_output_path(link, force=True)
    with pytest.raises(OutputPathError, match="a directory"):
        safe_output_path(tmp_path, force=True)
    with pytest.raises(OutputPathError, match="does not exist"):
        safe_output_path(tmp_path / "missing" / "m.safetensors", force=False)
    with pytest.raises(OutputPathError, match="allows"):
        safe_output_path(tmp_path / ("x" * 300), force=False)


def test_the_target_is_checked_again_before_the_rename(tmp_path: Path) -> None:
    target = safe_output_path(tmp_path / "m.safetensors", force=True)
    recheck = lambda: check_replaceable(target, True)
    with (
        pytest.raises(OutputPathError, match="FIFO"),
        atomic_output(target, before_replace=recheck) as out,
    ):
        out.write(b"new")
        os.mkfifo(target)  # replaced by something special while downloading
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temp left
    os.unlink(target)
    with atomic_output(target, before_replace=recheck) as out:
        out.write(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
