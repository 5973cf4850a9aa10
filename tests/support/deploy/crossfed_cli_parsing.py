"""Parse a `crossfed ...` command line with the real CLI without running it, so deployment
files are checked against the flags that exist today."""

from __future__ import annotations

from typing import Any

import typer

from crossfed.cli import app as crossfed_app


def parse_crossfed(args: list[str]) -> tuple[Any, dict[str, Any]]:
    """Parse ``crossfed ARGS`` with the real CLI, without running it (click raises on errors).

    Typer ships its own copy of click, so groups are recognised by `resolve_command`."""
    command: Any = typer.main.get_command(crossfed_app)
    parent: Any = None
    rest, name = list(args), "crossfed"
    while True:
        ctx = command.make_context(name, rest, parent=parent)
        if not hasattr(command, "resolve_command"):
            return command, dict(ctx.params)
        remaining = [*getattr(ctx, "_protected_args", []), *ctx.args]
        if not remaining:
            raise AssertionError(f"'crossfed {' '.join(args)}' names no sub-command")
        sub_name, sub, rest = command.resolve_command(ctx, remaining)
        assert sub is not None and sub_name is not None
        command, parent, name = sub, ctx, sub_name
