"""`crossfed demo`: a whole federation on one machine, the README's main command.

Provisions a CA, certificates and enrollment tokens, starts the coordination server and one
client daemon per Table I configuration (text-only, image-only, both) as separate processes
over TLS gRPC on loopback, follows the run through the Admin service, evaluates every
committed global model on a held-out test set per configuration, and writes a markdown report
with a PNG plot into the run folder. Every child process is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MODALITY_CYCLE = ("both", "text_only", "image_only")


class DemoOptions(BaseModel):
    """What a demo run does; validated so a bad flag is one readable line."""

    model_config = ConfigDict(extra="forbid")

    rounds: int = Field(default=5, ge=1, le=1000)
    clients: int = Field(default=3, ge=2, le=32)
    samples: int = Field(
        default=3000, ge=200, description="built-in dataset size shared by the clients"
    )
    test_samples: int = Field(default=1000, ge=100)
    epochs: int = Field(default=2, ge=1)
    alpha: float = Field(default=5.0, gt=0, description="Dirichlet label skew across clients")
    seed: int = Field(default=0, ge=0)
    run_dir: Path | None = None
    cache_dir: Path = Path("runs/.cache")
    timeout_s: float = Field(default=900.0, gt=0)
    progress: bool = True


@dataclass
class RoundResult:
    """Held-out scores of one committed global model, per Table I configuration."""

    round: int
    scores: dict[str, dict[str, float]]
    uploads: int
    seconds: float


@dataclass
class DemoResult:
    """Everything the report shows."""

    options: DemoOptions
    run_dir: Path
    rounds: list[RoundResult] = field(default_factory=list)
    client_modalities: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    final_state: str = ""


class DemoError(RuntimeError):
    """The demo could not finish; the message says what and where the logs are."""


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    """First Ctrl-C/SIGTERM: ignore the next ones (cleanup must finish), then unwind."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def run_demo(options: DemoOptions) -> DemoResult:
    """Run the federation end to end and write the report; children are always cleaned up."""
    from crossfed.demo.processes import ProcessSupervisor

    started = time.monotonic()
    run_dir = options.run_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    supervisor = ProcessSupervisor(run_dir / "logs")
    previous = {sig: signal.getsignal(sig) or signal.SIG_DFL for sig in _STOP_SIGNALS}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:  # `nohup`/background launches keep ignoring it
            signal.signal(sig, _interrupt)
    result = DemoResult(options=options, run_dir=run_dir)
    try:
        _federate(options, run_dir, supervisor, result)
    finally:
        # A second Ctrl-C must not cut the cleanup short: the children live in their own
        # sessions, so an interrupted stop_all would leave them running.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            supervisor.stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    result.wall_s = time.monotonic() - started
    from crossfed.demo.report import write_report

    write_report(result)
    return result


def _federate(options: DemoOptions, run_dir: Path, supervisor: Any, result: DemoResult) -> None:
    from crossfed.demo.evaluation import HeldOutEvaluator
    from crossfed.demo.watch import AdminWatcher
    from crossfed.provisioning import KitSpec, ProvisionPlan, provision

    kits = run_dir / "kits"
    names = [
        f"client-{i}-{MODALITY_CYCLE[i % 3].replace('_', '-')}" for i in range(options.clients)
    ]
    plan = ProvisionPlan(
        pki_dir=run_dir / "pki",
        server=KitSpec("server", kits / "server"),
        clients=tuple(KitSpec(name, kits / name) for name in names),
        admins=(KitSpec("demo-admin", kits / "admin"),),
    )
    provision(plan)
    port_file = run_dir / "server.port"
    port_file.unlink(missing_ok=True)
    server_state = kits / "server" / "state"
    supervisor.start(
        "server",
        [
            "server",
            "start",
            "--state-dir",
            str(server_state),
            "--listen",
            "127.0.0.1:0",
            "--port-file",
            str(port_file),
            "--rounds",
            str(options.rounds),
            "--min-clients",
            str(options.clients),
            "--heartbeat-ms",
            "200",
            "--keep-checkpoints",
            str(options.rounds + 1),
            "--seed",
            str(options.seed),
        ],
        env={"CROSSFED_TLS__CERT_DIR": str(kits / "server" / "kit" / "tls")},
    )
    address = f"127.0.0.1:{_wait_for_port(port_file, supervisor, timeout_s=120)}"
    # The held-out set is encoded while the clients encode theirs (same cache, atomic writes).
    for index, name in enumerate(names):
        modality = MODALITY_CYCLE[index % 3]
        result.client_modalities[name] = modality
        kit = kits / name
        supervisor.start(
            name,
            [
                "client",
                "start",
                "--config",
                str(kit / "kit" / "client.yaml"),
                "--server",
                address,
                "--cert-dir",
                str(kit / "kit" / "tls"),
                "--state-dir",
                str(kit / "state"),
                "--cache-dir",
                str(options.cache_dir.resolve()),
                "--data",
                "builtin",
                "--modality",
                modality,
                "--client-index",
                str(index),
                "--num-clients",
                str(options.clients),
                "--num-samples",
                str(options.samples),
                "--alpha",
                str(options.alpha),
                "--seed",
                str(options.seed),
                "--epochs",
                str(options.epochs),
                "--threads",
                "1",
                "--no-progress",
            ],
        )
    from crossfed.common.config import ServerConfig, load_config

    evaluator = HeldOutEvaluator.build(
        num_samples=options.test_samples,
        seed=options.seed + 1_000_003,
        cache_dir=options.cache_dir.resolve(),
        # the server's model as it builds it (CROSSFED_MODEL__* settings included)
        model_config=load_config(ServerConfig, None).model,
    )
    watcher = AdminWatcher.connect(
        address,
        certs_dir=kits / "admin" / "kit" / "tls",
        client_cert="demo-admin",
        credential=kits / "admin" / "kit" / "admin-credential.json",
    )
    try:
        result.final_state = watcher.follow(
            options=options,
            supervisor=supervisor,
            on_commit=lambda rnd, uploads, secs: result.rounds.append(
                RoundResult(rnd, evaluator.evaluate(watcher.export_model(rnd)), uploads, secs)
            ),
        )
    finally:
        watcher.close()
    if result.final_state != "completed":
        raise DemoError(f"the run ended {result.final_state}; logs in {run_dir / 'logs'}")
    # Clients leave on their own once told the run is done; the server is stopped afterwards.
    supervisor.wait_all(set(names), timeout_s=30)


def _wait_for_port(port_file: Path, supervisor: Any, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        supervisor.check_alive({"server"})
        if port_file.exists():
            text = port_file.read_text().strip()
            if text.isdigit():
                return int(text)
        time.sleep(0.1)
    raise DemoError(f"the server did not start within {timeout_s:.0f} s")


def demo_command(
    rounds: Annotated[int, typer.Option("--rounds", help="Federated rounds.")] = 5,
    clients: Annotated[
        int, typer.Option("--clients", help="Client daemons (cycling both/text-only/image-only).")
    ] = 3,
    samples: Annotated[int, typer.Option("--samples", help="Built-in dataset size.")] = 3000,
    epochs: Annotated[int, typer.Option("--epochs", help="Local epochs per round.")] = 2,
    alpha: Annotated[float, typer.Option("--alpha", help="Dirichlet label-skew alpha.")] = 5.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Where logs, report and plot go.")
    ] = None,
    cache_dir: Annotated[
        Path, typer.Option("--cache-dir", help="Embedding cache shared by demo runs.")
    ] = Path("runs/.cache"),
    timeout_s: Annotated[
        float, typer.Option("--timeout-s", help="Give up after this long.")
    ] = 900.0,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Plain log lines.")] = False,
) -> None:
    """Run server + text-only, image-only and paired clients on loopback (TLS gRPC)."""
    from crossfed.demo.processes import DemoProcessError
    from crossfed.demo.report import summary_table
    from crossfed.demo.watch import WatchError
    from crossfed.provisioning import ProvisioningError

    try:
        options = DemoOptions(
            rounds=rounds,
            clients=clients,
            samples=samples,
            epochs=epochs,
            alpha=alpha,
            seed=seed,
            run_dir=run_dir,
            cache_dir=cache_dir,
            timeout_s=timeout_s,
            progress=not no_progress,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        typer.echo(f"crossfed demo: {first['loc'][0]}: {first['msg']}", err=True)
        raise typer.Exit(2) from None
    try:
        result = run_demo(options)
    except (DemoError, DemoProcessError, ProvisioningError, WatchError) as exc:
        typer.echo(f"crossfed demo: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("crossfed demo: interrupted; every process it started is stopped", err=True)
        raise typer.Exit(130) from None
    typer.echo(summary_table(result))
    typer.echo(f"report: {result.run_dir / 'report.md'}  plot: {result.run_dir / 'accuracy.png'}")
    typer.echo(f"wall time: {result.wall_s:.1f} s")
    (result.run_dir / "result.json").write_text(
        json.dumps(
            {
                "wall_s": result.wall_s,
                "final_state": result.final_state,
                "rounds": [r.__dict__ for r in result.rounds],
                "clients": result.client_modalities,
            },
            indent=2,
        )
    )
