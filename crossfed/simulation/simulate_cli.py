"""`crossfed simulate EXPERIMENT`: run an experiment file's federation on virtual clients
(Ray by default) and write result.json, report.md and accuracy.png. Thin: the work is in
experiment_run.py. Every bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer

EXIT_BAD_INPUT = 2


def _fail(message: str) -> NoReturn:
    typer.echo(f"crossfed simulate: {message}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def simulate_command(
    experiment: Annotated[
        Path, typer.Argument(help="Experiment file (YAML or TOML); see README 'Simulation'.")
    ],
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="Join this Ray cluster ('auto' or host:port) instead of starting one here.",
        ),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            "--backend", help="ray (default) or inline (clients one by one in this process)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output directory (default: runs/simulate-<name>-<time>/)."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the result document as JSON on stdout.")
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
) -> None:
    """Simulate a federation of virtual clients: the real client trainer and the server's
    aggregation, per-round scores per Table I configuration, every method of the experiment."""
    from crossfed.common.config import ConfigError
    from crossfed.common.data.data_errors import DataError
    from crossfed.common.model.model_errors import ModelError
    from crossfed.simulation.experiment import load_experiment
    from crossfed.simulation.experiment_run import run_experiment
    from crossfed.simulation.simulation_errors import SimulationError
    from crossfed.simulation.simulation_report import document, markdown, write_outputs

    overrides: dict[str, object] = {}
    if ray_address is not None:
        overrides["execution.address"] = ray_address
    if backend is not None:
        overrides["execution.backend"] = backend
    try:
        cfg = load_experiment(experiment, overrides)
        if cfg.execution.backend == "ray":
            from crossfed.simulation.ray_executor import import_ray

            import_ray()  # say how to install Ray before any data is encoded
        result = run_experiment(cfg, progress=not no_progress)
    except (ConfigError, SimulationError, DataError, ModelError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
    out_dir = out or Path("runs") / f"simulate-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    written = write_outputs(result, out_dir)
    if json_output:
        typer.echo(json.dumps(document(result), indent=2, allow_nan=True))
    else:
        typer.echo(markdown(result))
        typer.echo("wrote " + ", ".join(str(p) for p in written))
