"""`crossfed server ...`: run the coordination server (flags override the config file)."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

app = typer.Typer(help="Run the coordination server.", no_args_is_help=True)


@app.command("start")
def start(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML/TOML ServerConfig.")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="SQLite state + checkpoints.")
    ] = None,
    listen: str | None = typer.Option(None, "--listen", help="host:port to serve on."),
    insecure: bool = typer.Option(
        False, "--insecure", help="Plaintext gRPC, no client auth (loopback/dev only)."
    ),
    insecure_off_loopback: bool = typer.Option(
        False,
        "--insecure-off-loopback",
        help="With --insecure: allow a non-loopback --listen address (anyone who reaches it "
        "can drive the server).",
    ),
    allow_unencrypted_uploads: bool = typer.Option(
        False, "--allow-unencrypted-uploads", help="Accept plaintext uploads (tests only)."
    ),
    classes: str | None = typer.Option(
        None,
        "--classes",
        help="The federation's class names in index order, comma-separated (or a file with "
        "one per line, @classes.txt); the model's class count follows. Default: the built-in "
        "dataset's 12 classes.",
    ),
    rounds: int | None = typer.Option(None, "--rounds", help="Rounds to run."),
    min_clients: int | None = typer.Option(None, "--min-clients"),
    fraction: float | None = typer.Option(None, "--fraction", help="Share of clients selected."),
    round_deadline_s: float | None = typer.Option(None, "--round-deadline-s"),
    start_timeout_s: float | None = typer.Option(
        None, "--start-timeout-s", help="Wait this long for min_clients before failing a round."
    ),
    client_timeout_s: float | None = typer.Option(None, "--client-timeout-s"),
    heartbeat_ms: int | None = typer.Option(None, "--heartbeat-ms"),
    wait_after_min_s: float | None = typer.Option(
        None, "--wait-after-min-s", help="Straggler cut-off after min_clients uploaded."
    ),
    keep_checkpoints: int | None = typer.Option(None, "--keep-checkpoints"),
    seed: int | None = typer.Option(None, "--seed", help="Initial model and selection seed."),
    strategy: str | None = typer.Option(
        None, "--strategy", help="Aggregation strategy (config: strategy.name), e.g. fedavg."
    ),
    standin_model: bool = typer.Option(
        False, "--standin-model", help="Placeholder model when the network is not built."
    ),
    exit_when_done: bool = typer.Option(
        False, "--exit-when-done", help="Exit once the run completed/failed (after a linger)."
    ),
    torch_threads: int | None = typer.Option(None, "--torch-threads", help="Intra-op threads."),
    done_linger_s: float = typer.Option(
        5.0, "--done-linger-s", help="With --exit-when-done: keep answering DONE this long."
    ),
    port_file: Annotated[
        Path | None, typer.Option("--port-file", help="Write the bound port here.")
    ] = None,
    log_level: str = typer.Option("INFO", "--log-level"),
    log_json: bool = typer.Option(False, "--log-json", help="One JSON object per log line."),
    metrics_port: int | None = typer.Option(
        None, "--metrics-port", help="Serve Prometheus /metrics on this port."
    ),
    autostart: bool = typer.Option(
        True, "--autostart/--no-autostart", help="--no-autostart: wait for `crossfed admin start`."
    ),
) -> None:
    """Start (or resume, with the same --state-dir) the coordination server."""
    from crossfed.common.config import ConfigError, ServerConfig, load_config
    from crossfed.common.data.class_list import parse_class_list
    from crossfed.common.data.data_errors import DataError
    from crossfed.server.errors import ServerError
    from crossfed.server.server_app import CoordinatorServer, ServerOptions
    from crossfed.server.structured_logging import LoggingSetupError, configure_logging

    overrides: dict[str, object] = {}
    for key, value in (
        ("state_dir", state_dir),
        ("listen", listen),
        ("rounds.rounds", rounds),
        ("rounds.min_clients", min_clients),
        ("rounds.fraction", fraction),
        ("rounds.round_deadline_s", round_deadline_s),
        ("metrics_port", metrics_port),
        ("rounds.start_timeout_s", start_timeout_s),
        ("rounds.client_timeout_s", client_timeout_s),
        ("rounds.heartbeat_ms", heartbeat_ms),
        ("rounds.wait_after_min_s", wait_after_min_s),
        ("keep_checkpoints", keep_checkpoints),
        ("seed", seed),
        ("torch_threads", torch_threads),
        ("strategy.name", strategy),
    ):
        if value is not None:
            overrides[key] = str(value) if isinstance(value, Path) else value
    if insecure:
        overrides["tls.insecure"] = True
    if insecure_off_loopback:
        overrides["tls.insecure_off_loopback"] = True
    if log_json:
        overrides["log_json"] = True
    if allow_unencrypted_uploads:
        overrides["allow_unencrypted_uploads"] = True
    try:
        if classes is not None:
            overrides["classes"] = parse_class_list(classes)
        cfg = load_config(ServerConfig, config, overrides=overrides)
        configure_logging(log_level, json_lines=cfg.log_json)
        options = ServerOptions(
            standin_model=standin_model,
            exit_when_done=exit_when_done,
            auto_start=autostart,
            done_linger_s=done_linger_s,
        )
        server = CoordinatorServer.create(cfg, options)
        port = server.start()
    except (ConfigError, ServerError, LoggingSetupError, DataError) as exc:
        typer.echo(f"crossfed server: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:  # a file in the state dir the server cannot use: one line
        typer.echo(f"crossfed server: {exc}", err=True)
        raise typer.Exit(2) from None

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("signal %d: shutting down", signum)
        server.request_stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    run = server.engine.run
    typer.echo(
        f"crossfed server listening on port {port}; run {run.run_id} {run.state}, "
        f"round {run.last_committed_round}/{run.total_rounds} committed",
        err=True,
    )
    if port_file is not None:
        port_file.write_text(str(port))
    try:
        server.wait()
    finally:
        server.stop()
    final = server.engine.run
    typer.echo(f"crossfed server stopped; run {final.state}: {final.message}", err=True)
    sys.exit(0)


@app.command("token")
def token(
    state_dir: Annotated[Path, typer.Option("--state-dir", help="The server's state directory.")],
    client_id: Annotated[
        str | None, typer.Option("--client-id", help="Bind the token to this client id.")
    ] = None,
    ttl_s: float = typer.Option(86400.0, "--ttl-s", help="Seconds until the token expires."),
) -> None:
    """Print a one-time enrollment token for a client (run on the server host)."""
    from crossfed.common.crypto.identity import EnrollmentError, create_enrollment_token
    from crossfed.server.credential_store import SqliteCredentialStore
    from crossfed.server.errors import ServerError
    from crossfed.server.server_app import CREDENTIALS_DB
    from crossfed.server.state.factory import prepare_state_dir

    try:
        store = SqliteCredentialStore(prepare_state_dir(state_dir) / CREDENTIALS_DB)
        issued = create_enrollment_token(store, ttl_s=ttl_s, client_id=client_id)
        store.close()
    except (EnrollmentError, ServerError) as exc:
        typer.echo(f"crossfed server token: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(issued.token.reveal())
