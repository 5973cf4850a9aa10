"""Rich progress bars for long work (encoding, training), off when not a TTY or when asked."""

from __future__ import annotations

import sys

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def make_progress(enabled: bool = True) -> Progress:
    """A Progress that renders only if `enabled` and stderr is a terminal."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not (enabled and sys.stderr.isatty()),
        transient=True,
    )
