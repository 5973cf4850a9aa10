"""The `crossfed` command: one entry point, one sub-command group per purpose.

Each group lives beside the code it drives (server/cli.py, client/cli.py, ...) and is
imported here; groups keep heavy imports (torch, grpc) inside their commands so that
`crossfed --help` stays fast.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from crossfed import __version__

app = typer.Typer(
    name="crossfed",
    help="Federated multimodal learning that keeps working when clients miss a modality.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"crossfed {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """crossfed: server, client daemons, admin CLI and demo."""


def _register_groups() -> None:
    """Attach the sub-command groups; one line per group (keep alphabetical)."""
    # -- sub-command groups (add yours here) --
    from crossfed.admin_cli import admin_app

    app.add_typer(admin_app, name="admin")
    from crossfed.common.crypto.certs_cli import app as certs_app

    app.add_typer(certs_app, name="certs")
    from crossfed.client.cli import client_app

    app.add_typer(client_app, name="client")
    from crossfed.demo.run import demo_command

    app.command("demo")(demo_command)
    from crossfed.deploy_cli import app as deploy_app

    app.add_typer(deploy_app, name="deploy")
    from crossfed.inference_cli import evaluate_command, predict_command

    app.command("evaluate")(evaluate_command)
    app.command("predict")(predict_command)
    from crossfed.sd_spec_cli import sd_spec_command

    app.command("sd-spec")(sd_spec_command)
    from crossfed.server.cli import app as server_app

    app.add_typer(server_app, name="server")
    from crossfed.simulation.simulate_cli import simulate_command

    app.command("simulate")(simulate_command)


_register_groups()


EXIT_INTERRUPTED = 130


def _exit_interrupted() -> None:
    """Leave with status 130 after Ctrl-C, whatever the interpreter remembers.

    CPython turns the exit status into "killed by SIGINT" when a KeyboardInterrupt escaped
    some code it ran on the way (a flag it never clears), even if we caught it later; a
    caller that waits for 130 would then see -2. Flush what we wrote and exit directly.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_INTERRUPTED)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        _exit_interrupted()
    except SystemExit as exc:
        if exc.code == EXIT_INTERRUPTED:
            _exit_interrupted()
        raise
