"""`crossfed admin ...`: operate a running coordination server through its gRPC Admin service
(admin credential): status, clients, rounds, run control, live config, model export, client
removal, enrollment tokens and a live watch view. Rich tables by default, ``--json`` for
scripts; every failure is one ``error: ...`` line and a non-zero exit code (1; 2 for bad
local options). gRPC and protobuf are imported inside commands so `crossfed --help` stays fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Self

import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rich import box
from rich.console import Console
from rich.table import Table

from crossfed.common.atomic_files import atomic_output
from crossfed.output_paths import OutputPathError, check_replaceable, safe_output_path

if TYPE_CHECKING:
    import grpc

    from crossfed.common.model.model_bundle import ModelBundle
    from crossfed.v1 import admin_pb2

admin_app = typer.Typer(
    help="Operate a running server (needs the admin credential the server wrote to its "
    "state dir, e.g. state/admin.credential.json).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_ERROR = 1
EXIT_USAGE = 2
MODALITY_NAMES = {0: "unspecified", 1: "both", 2: "text_only", 3: "image_only"}
TERMINAL_EVENTS = frozenset({"run_completed", "run_stopped", "run_failed"})
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_EXPORT_MIN_TIMEOUT_S = 600.0


class AdminCliError(Exception):
    """A failure the admin CLI reports as one line (``error: ...``) with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(" ".join(message.split()))
        self.exit_code = exit_code


class ConnectionSettings(BaseModel):
    """How to reach and authenticate to the server (CLI flags / CROSSFED_* env, validated)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    server: str = Field(description="host:port of the server")
    certs_dir: Path = Field(description="directory with the project CA (ca.crt)")
    credential: Path | None = Field(default=None, description="admin credential JSON")
    insecure: bool = False
    timeout_s: float = Field(default=10.0, gt=0)
    tls_server_name: str | None = None
    client_cert: str | None = Field(default=None, description="admin certificate name (mTLS)")

    @field_validator("server")
    @classmethod
    def _address(cls, value: str) -> str:
        match = _ADDRESS.match(value)
        if match is None or not 0 < int(match.group(2)) < 65536:
            raise ValueError(f"expected host:port, e.g. 127.0.0.1:50051, got {value!r}")
        return value


@dataclass
class CliState:
    """What the group callback hands to each command."""

    settings: ConnectionSettings
    json_output: bool
    console: Console


def _fail(message: str, exit_code: int = EXIT_ERROR) -> NoReturn:
    raise AdminCliError(message, exit_code)


def describe_rpc_error(error: grpc.RpcError, settings: ConnectionSettings) -> str:
    """One human line for a failed call: unreachable, timed out, refused, or the server's
    own message (e.g. FAILED_PRECONDITION 'run is running, only a paused run can resume')."""
    import grpc

    code = error.code() if isinstance(error, grpc.Call) else None
    details = (error.details() if isinstance(error, grpc.Call) else "") or ""
    first = details.strip().splitlines()[0] if details.strip() else ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach the server at {settings.server}: {first or 'unavailable'}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the server at {settings.server} did not answer in time ({first or 'deadline'})"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"authentication failed: {first}"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"permission denied: {first}"
    if first:
        return first
    return f"call failed with {code.name if code is not None else 'an unknown status'}"


class AdminSession:
    """An authenticated channel to the Admin service; maps gRPC failures to AdminCliError."""

    def __init__(self, settings: ConnectionSettings) -> None:
        import grpc

        from crossfed.common.crypto.identity import ClientCredential, IdentityError
        from crossfed.common.crypto.rpc_auth import authenticated_channel
        from crossfed.v1 import admin_pb2_grpc

        self.settings = settings
        credential = None
        if settings.credential is not None:
            try:
                credential = ClientCredential.load(settings.credential)
            except IdentityError as exc:
                _fail(str(exc))
        elif not settings.insecure:
            _fail(
                "admin RPCs need the admin credential: pass --credential "
                "STATE_DIR/admin.credential.json (written by the server at first start) or set "
                "CROSSFED_ADMIN_CREDENTIAL"
            )
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ]
        if settings.insecure:
            channel = grpc.insecure_channel(settings.server, options=options)
        else:
            channel = grpc.secure_channel(
                settings.server, self._tls(), options=self._tls_options(options)
            )
        self._raw_channel = channel
        if credential is not None:
            channel = authenticated_channel(channel, credential)
        self.stub = admin_pb2_grpc.AdminStub(channel)

    def _tls(self) -> grpc.ChannelCredentials:
        from crossfed.common.crypto.certificates import CertificateError, Role
        from crossfed.common.crypto.grpc_credentials import channel_credentials

        try:
            return channel_credentials(
                self.settings.certs_dir, self.settings.client_cert, role=Role.ADMIN
            )
        except (CertificateError, OSError) as exc:
            _fail(f"TLS setup failed: {exc} (or pass --insecure for a plaintext dev server)")

    def _tls_options(self, options: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        name = self.settings.tls_server_name
        return [*options, ("grpc.ssl_target_name_override", name)] if name else options

    def call(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        """Unary call ``method`` with the configured deadline."""
        import grpc

        try:
            return getattr(self.stub, method)(request, timeout=timeout_s or self.settings.timeout_s)
        except grpc.RpcError as exc:
            _fail(describe_rpc_error(exc, self.settings))

    @contextlib.contextmanager
    def stream_errors(self) -> Iterator[None]:
        """Map errors raised while iterating a server stream."""
        import grpc

        try:
            yield
        except grpc.RpcError as exc:
            _fail(describe_rpc_error(exc, self.settings))

    def close(self) -> None:
        self._raw_channel.close()


# --------------------------------------------------------------------------- plumbing


def _state(ctx: typer.Context) -> CliState:
    state = ctx.obj
    assert isinstance(state, CliState), "admin group callback did not run"
    return state


@contextlib.contextmanager
def _session(ctx: typer.Context) -> Iterator[tuple[CliState, AdminSession]]:
    """Open a session; any AdminCliError becomes ``error: ...`` on stderr and an exit code."""
    state = _state(ctx)
    session: AdminSession | None = None
    try:
        session = AdminSession(state.settings)
        yield state, session
    except AdminCliError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    finally:
        if session is not None:
            session.close()


def _emit(state: CliState, data: Any, render: Callable[[Console], None]) -> None:
    if state.json_output:
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        render(state.console)


def _json_flag(ctx: typer.Context, value: bool) -> None:
    if value and isinstance(ctx.obj, CliState):
        ctx.obj.json_output = True


JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Machine-readable JSON output.", callback=_json_flag),
]


def _ago(unix_s: float) -> str:
    if unix_s <= 0:
        return "-"
    seconds = max(0.0, time.time() - unix_s)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


#: Metrics a human table shows (Table I accuracy of the global model); --json shows all.
_HEADLINE_METRICS = (
    ("global_acc_both", "both"),
    ("global_acc_text_only", "text"),
    ("global_acc_image_only", "image"),
)


def _accuracy_triple(values: dict[str, float]) -> str:
    """'0.951/0.812/0.700': the round's global accuracy on both / text / image ('-' absent)."""
    return "/".join(f"{values[k]:.3f}" if k in values else "-" for k, _ in _HEADLINE_METRICS)


def _metrics_text(values: dict[str, float]) -> str:
    """Headline accuracies when present, otherwise every metric."""
    headline = [f"{label}={values[key]:.3f}" for key, label in _HEADLINE_METRICS if key in values]
    if headline:
        return "acc " + " ".join(headline)
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())) or "-"


@admin_app.callback()
def _connection(
    ctx: typer.Context,
    server: Annotated[
        str, typer.Option("--server", envvar="CROSSFED_SERVER", help="Server host:port.")
    ] = "127.0.0.1:50051",
    certs_dir: Annotated[
        Path,
        typer.Option(
            "--certs-dir", envvar="CROSSFED_CERTS_DIR", help="Directory with the CA (ca.crt)."
        ),
    ] = Path("certs"),
    credential: Annotated[
        Path | None,
        typer.Option(
            "--credential",
            envvar="CROSSFED_ADMIN_CREDENTIAL",
            help="Admin credential JSON (state_dir/admin.credential.json).",
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure", envvar="CROSSFED_INSECURE", help="Plaintext gRPC (loopback dev only)."
        ),
    ] = False,
    timeout_s: Annotated[
        float,
        typer.Option("--timeout", envvar="CROSSFED_ADMIN_TIMEOUT", help="Seconds per call."),
    ] = 10.0,
    tls_server_name: Annotated[
        str | None,
        typer.Option(
            "--tls-server-name",
            envvar="CROSSFED_TLS_SERVER_NAME",
            help="Expected name in the server certificate (when it differs from the host).",
        ),
    ] = None,
    client_cert: Annotated[
        str | None,
        typer.Option(
            "--client-cert",
            envvar="CROSSFED_ADMIN_CERT",
            help="Admin certificate name in certs-dir/admin/ (servers that require mTLS).",
        ),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Machine-readable JSON output.")
    ] = False,
) -> None:
    """Connection options (also from CROSSFED_SERVER, CROSSFED_CERTS_DIR, ...)."""
    try:
        settings = ConnectionSettings(
            server=server,
            certs_dir=certs_dir,
            credential=credential,
            insecure=insecure,
            timeout_s=timeout_s,
            tls_server_name=tls_server_name,
            client_cert=client_cert,
        )
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        typer.echo(f"error: --{where.replace('_', '-')}: {message}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    ctx.obj = CliState(settings, json_output, Console(highlight=False))


# --------------------------------------------------------------------------- queries


def status_dict(response: admin_pb2.GetStatusResponse) -> dict[str, Any]:
    """GetStatusResponse as plain JSON-able data."""
    return {
        "run_id": response.run_id,
        "run_state": response.run_state,
        "current_round": response.current_round,
        "total_rounds": response.total_rounds,
        "last_committed_round": response.last_committed_round,
        "clients_by_state": dict(response.clients_by_state),
        "epsilon_spent": response.epsilon_spent,
        "epsilon_budget": response.epsilon_budget,
        "last_metrics": dict(response.last_metrics.values),
        "server_version": response.server_version,
        "uptime_s": response.uptime_s,
        "strategy": response.strategy,
        "strategy_params": dict(response.strategy_params),
        "central_dp": response.central_dp,
    }


@admin_app.command("status")
def status(ctx: typer.Context, json_output: JsonOpt = False) -> None:
    """Run state, round progress, clients by state, privacy spent, last metrics."""
    from crossfed.v1 import admin_pb2

    with _session(ctx) as (state, session):
        data = status_dict(session.call("GetStatus", admin_pb2.GetStatusRequest()))

    def render(console: Console) -> None:
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold")
        table.add_column()
        table.add_row("run", f"{data['run_id']} ({data['run_state']})")
        current, total = data["current_round"], data["total_rounds"]
        table.add_row(
            "round",
            (
                f"{current}: calibration after {total} rounds"
                if current > total
                else f"{current} of {total}"
            )
            + f" (last committed {data['last_committed_round']})",
        )
        clients = data["clients_by_state"]
        table.add_row("clients", " ".join(f"{k}={v}" for k, v in sorted(clients.items())) or "none")
        budget = data["epsilon_budget"]
        table.add_row(
            "epsilon", f"{data['epsilon_spent']:.4g}" + (f" of {budget:.4g}" if budget else "")
        )
        params = " ".join(f"{k}={v:g}" for k, v in sorted(data["strategy_params"].items()))
        table.add_row(
            "strategy",
            " ".join(
                part
                for part in (
                    data["strategy"] or "?",
                    params,
                    "(central DP)" if data["central_dp"] else "",
                )
                if part
            ),
        )
        table.add_row("last metrics", _metrics_text(data["last_metrics"]))
        table.add_row(
            "server", f"crossfed {data['server_version']}, up {_duration(data['uptime_s'])}"
        )
        console.print(table)

    _emit(state, data, render)


@admin_app.command("clients")
def clients(ctx: typer.Context, json_output: JsonOpt = False) -> None:
    """Registered clients: modality, samples, state, last seen, rounds completed."""
    from crossfed.v1 import admin_pb2

    with _session(ctx) as (state, session):
        response = session.call("ListClients", admin_pb2.ListClientsRequest())
    rows = [
        {
            "client_id": c.client_id,
            "modality": MODALITY_NAMES.get(int(c.modality), str(c.modality)),
            "num_samples": c.num_samples,
            "rows": {
                "both": c.num_paired,
                "text_only": c.num_text_only,
                "image_only": c.num_image_only,
            },
            "state": c.state,
            "last_seen_unix_s": c.last_seen_unix_s,
            "last_round": c.last_round,
            "rounds_completed": c.rounds_completed,
        }
        for c in response.clients
    ]

    def render(console: Console) -> None:
        if not rows:
            console.print("no clients registered")
            return
        table = Table(title=f"{len(rows)} client(s)", box=box.SIMPLE_HEAD)
        table.add_column("client", overflow="fold")
        table.add_column("modality")
        for column in ("both", "text", "image"):
            table.add_column(column, justify="right")
        for column in ("state", "seen"):
            table.add_column(column)
        table.add_column("rounds", justify="right")
        for r in rows:
            counts = r["rows"]
            table.add_row(
                r["client_id"],
                r["modality"],
                *(str(counts[k]) for k in ("both", "text_only", "image_only")),
                r["state"],
                _ago(r["last_seen_unix_s"]),
                str(r["rounds_completed"]),
            )
        console.print(table)
        console.print("both / text / image: the client's training rows per Table I configuration")

    _emit(state, rows, render)


@admin_app.command("rounds")
def rounds(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", min=0, help="Newest N attempts; 0 = all.")] = 20,
    json_output: JsonOpt = False,
) -> None:
    """Round attempts, newest first (a failed round is retried as a new attempt)."""
    from crossfed.v1 import admin_pb2

    with _session(ctx) as (state, session):
        response = session.call("ListRounds", admin_pb2.ListRoundsRequest(limit=limit))
    rows = [
        {
            "round": r.round,
            "attempt": r.attempt,
            "state": r.state,
            "started_unix_s": r.started_unix_s,
            "ended_unix_s": r.ended_unix_s,
            "selected": r.selected,
            "received": r.received,
            "num_samples": r.num_samples,
            "metrics": dict(r.metrics.values),
            "message": r.message,
        }
        for r in response.rounds
    ]

    def render(console: Console) -> None:
        if not rows:
            console.print("no rounds yet")
            return
        # fits 80 columns: the attempt joins the round ("3#2"), accuracies are one compact
        # column, and the messages of rounds that did not commit follow the table, wrapped
        # (--json has everything)
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("round", no_wrap=True)
        table.add_column("state", no_wrap=True)
        table.add_column("uploads", justify="right", no_wrap=True)
        table.add_column("samples", justify="right", no_wrap=True)
        table.add_column("took", justify="right", no_wrap=True)
        table.add_column("acc both/text/image", no_wrap=True)
        notes = []
        for r in rows:
            took = r["ended_unix_s"] - r["started_unix_s"] if r["ended_unix_s"] else 0.0
            name = f"{r['round']}" + (f"#{r['attempt']}" if r["attempt"] > 1 else "")
            table.add_row(
                name,
                r["state"],
                f"{r['received']}/{r['selected']}",
                str(r["num_samples"]),
                _duration(took) if r["ended_unix_s"] else "open",
                _accuracy_triple(r["metrics"]),
            )
            if r["state"] != "committed" and r["message"]:
                notes.append(f"round {name} {r['state']}: {r['message']}")
        console.print(table)
        for note in notes:
            console.print(note, overflow="fold")

    _emit(state, rows, render)


# --------------------------------------------------------------------------- run control


def _control_result(state: CliState, response: Any) -> None:
    data = {"run_state": response.run_state, "message": response.message}
    _emit(state, data, lambda c: c.print(f"run {data['run_state']}: {data['message']}"))


ReasonOpt = Annotated[str, typer.Option("--reason", help="Recorded in the event log.")]


@admin_app.command("start")
def start(
    ctx: typer.Context,
    rounds_: Annotated[int, typer.Option("--rounds", min=0, help="Total rounds (0: keep).")] = 0,
    min_clients: Annotated[
        int, typer.Option("--min-clients", min=0, help="Updates a round needs (0: keep).")
    ] = 0,
    fraction: Annotated[
        float, typer.Option("--fraction", min=0.0, help="Share of clients selected (0: keep).")
    ] = 0.0,
    deadline_s: Annotated[
        float, typer.Option("--deadline", min=0.0, help="Round deadline in seconds (0: keep).")
    ] = 0.0,
    json_output: JsonOpt = False,
) -> None:
    """Start an idle run (server started with --no-autostart), optionally changing settings."""
    from crossfed.v1 import admin_pb2

    request = admin_pb2.StartRunRequest(
        rounds=rounds_, min_clients=min_clients, fraction=fraction, round_deadline_s=deadline_s
    )
    with _session(ctx) as (state, session):
        _control_result(state, session.call("StartRun", request))


@admin_app.command("pause")
def pause(ctx: typer.Context, reason: ReasonOpt = "", json_output: JsonOpt = False) -> None:
    """Pause: no new round starts; an open round finishes."""
    from crossfed.v1 import admin_pb2

    with _session(ctx) as (state, session):
        _control_result(state, session.call("PauseRun", admin_pb2.RunControlRequest(reason=reason)))


@admin_app.command("resume")
def resume(ctx: typer.Context, reason: ReasonOpt = "", json_output: JsonOpt = False) -> None:
    """Resume a paused run."""
    from crossfed.v1 import admin_pb2

    with _session(ctx) as (state, session):
        _control_result(
            state, session.call("ResumeRun", admin_pb2.RunControlRequest(reason=reason))
        )


@admin_app.command("stop")
def stop(ctx: typer.Context, reason: ReasonOpt = "", json_output: JsonOpt = False) -> None:
    """End the run now (an open round is failed; clients are told DONE)."""
    from crossfed.v1 import admin_pb2

    with _session(ctx) as (state, session):
        _control_result(state, session.call("StopRun", admin_pb2.RunControlRequest(reason=reason)))


def parse_assignments(items: list[str]) -> dict[str, str]:
    """['rounds.min_clients=3', ...] -> {'rounds.min_clients': '3'}; malformed -> error."""
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            _fail(f"expected KEY=VALUE (e.g. rounds.min_clients=3), got {item!r}", EXIT_USAGE)
        if key in values:
            _fail(f"{key} is given twice", EXIT_USAGE)
        values[key] = value
    return values


@admin_app.command("set")
def set_config(
    ctx: typer.Context,
    assignments: Annotated[
        list[str], typer.Argument(help="KEY=VALUE pairs, e.g. rounds.min_clients=3.")
    ],
    json_output: JsonOpt = False,
) -> None:
    """Change live settings (whitelisted keys, validated; a bad value changes nothing)."""
    from crossfed.v1 import admin_pb2

    with _session(ctx) as (state, session):
        values = parse_assignments(assignments)
        response = session.call("UpdateConfig", admin_pb2.UpdateConfigRequest(values=values))
        applied = dict(response.applied)

    def render(console: Console) -> None:
        for key, value in sorted(applied.items()):
            console.print(f"{key} = {value}")

    _emit(state, applied, render)


# --------------------------------------------------------------------------- model export


def check_bundle_bytes(data: bytearray, path: Path) -> ModelBundle:
    """Decode the exported bytes as a model bundle (every check `crossfed evaluate` makes)."""
    from crossfed.common.model.model_bundle import BundleError, decode_bundle

    try:
        return decode_bundle(memoryview(data), str(path))
    except BundleError as exc:
        _fail(f"the exported model bundle does not load: {exc}")


def export_model_to(
    session: AdminSession, path: Path, round_no: int, force: bool = False
) -> dict[str, Any]:
    """The model bundle of ``round_no`` (0 = latest) into ``path``: the path checked first,
    chunks in order, size and SHA-256 verified, the bundle loaded, then written atomically."""
    from crossfed.v1 import admin_pb2

    try:
        path = safe_output_path(Path(path), force)  # before a byte is fetched
    except OutputPathError as exc:
        _fail(str(exc))
    sha = hashlib.sha256()
    expected_digest = b""
    expected_size = total = received = version = 0
    payload = bytearray()
    request = admin_pb2.ExportModelRequest(round=round_no)
    timeout = max(session.settings.timeout_s, _EXPORT_MIN_TIMEOUT_S)
    with session.stream_errors():
        for chunk in session.stub.ExportModel(request, timeout=timeout):
            if received == 0:
                total, expected_size = int(chunk.total), int(chunk.payload_size)
                expected_digest, version = bytes(chunk.payload_sha256), int(chunk.round)
            elif chunk.total != total or bytes(chunk.payload_sha256) != expected_digest:
                _fail(f"chunk {chunk.index} disagrees with the first chunk's total/digest")
            if chunk.index != received:
                _fail(f"chunk {chunk.index} arrived where chunk {received} was expected")
            sha.update(chunk.data)
            payload += chunk.data
            received += 1
    if received == 0 or received != total:
        _fail(f"export stream ended after {received} of {total or '?'} chunks (truncated)")
    if len(payload) != expected_size:
        _fail(f"received {len(payload)} bytes but the server announced {expected_size}")
    if sha.digest() != expected_digest:
        _fail("SHA-256 of the received model does not match the server's digest")
    bundle = check_bundle_bytes(payload, path)
    try:  # the target is checked again right before the rename: it may have changed
        with atomic_output(path, before_replace=lambda: check_replaceable(path, force)) as out:
            out.write(payload)
    except OutputPathError as exc:
        _fail(str(exc))
    except OSError as exc:  # e.g. the disk filled up
        _fail(f"cannot write {path}: {exc.strerror or exc}")
    written = len(payload)
    return {
        "path": str(path),
        "round": version,
        "bytes": written,
        "sha256": expected_digest.hex(),
        "tensors": len(bundle.state),
        "classes": list(bundle.class_names),
        "prototypes": bundle.prototypes is not None,
        "epsilon": bundle.epsilon,
        "text_encoder": None if bundle.text_encoder is None else bundle.text_encoder.identity,
        "image_encoder": None if bundle.image_encoder is None else bundle.image_encoder.identity,
    }


@admin_app.command("export-model")
def export_model(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="Output model bundle (.safetensors).")],
    round_no: Annotated[
        int, typer.Option("--round", min=0, help="Committed round; 0 = latest.")
    ] = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Download a committed global model as a model bundle (weights, model config, class
    names, global prototypes, encoders, epsilon): digest-verified, checked, written atomically;
    `crossfed evaluate` and `crossfed predict` take it."""
    with _session(ctx) as (state, session):
        info = export_model_to(session, path, round_no, force)
    _emit(
        state,
        info,
        lambda c: c.print(
            f"wrote {info['path']}: model bundle of round {info['round']}, "
            f"{len(info['classes'])} classes, {info['tensors']} tensors, {info['bytes']} bytes, "
            f"sha256 {info['sha256'][:16]}...",
            soft_wrap=True,
        ),
    )


# --------------------------------------------------------------------------- clients


@admin_app.command("remove-client")
def remove_client(
    ctx: typer.Context,
    client_id: Annotated[str, typer.Argument(help="Client id (see `crossfed admin clients`).")],
    json_output: JsonOpt = False,
) -> None:
    """Remove a client and revoke its credential (it must enroll again to rejoin)."""
    from crossfed.v1 import admin_pb2

    with _session(ctx) as (state, session):
        response = session.call("RemoveClient", admin_pb2.RemoveClientRequest(client_id=client_id))
    data = {"client_id": client_id, "removed": response.removed}
    _emit(state, data, lambda c: c.print(f"removed client {client_id}"))


@admin_app.command("enroll-token")
def enroll_token(
    ctx: typer.Context,
    ttl_s: Annotated[
        float, typer.Option("--ttl", min=0.0, help="Seconds it stays valid; 0 = server default.")
    ] = 0.0,
    client_id: Annotated[
        str, typer.Option("--client-id", help="Bind the token to this client id.")
    ] = "",
    json_output: JsonOpt = False,
) -> None:
    """Create a one-time enrollment token for a new client (shown once)."""
    from crossfed.v1 import admin_pb2

    with _session(ctx) as (state, session):
        response = session.call(
            "CreateEnrollmentToken",
            admin_pb2.CreateEnrollmentTokenRequest(ttl_s=ttl_s, client_id=client_id),
        )
    data = {"token": response.token, "expires_unix_s": response.expires_unix_s}

    def render(console: Console) -> None:
        console.print(response.token, soft_wrap=True)
        if response.expires_unix_s:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(response.expires_unix_s))
            console.print(f"one-time token, valid until {when}", style="dim")

    _emit(state, data, render)


# --------------------------------------------------------------------------- watch


def event_dict(event: admin_pb2.Event) -> dict[str, Any]:
    """An Event as plain JSON-able data."""
    return {
        "event_id": event.event_id,
        "time_unix_s": event.time_unix_s,
        "kind": event.kind,
        "round": event.round,
        "client_id": event.client_id,
        "message": event.message,
        "values": dict(event.values),
    }


def event_line(event: admin_pb2.Event) -> str:
    """One human line per event."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.time_unix_s))
    parts = [stamp, event.kind]
    if event.round:
        parts.append(f"round {event.round}")
    if event.client_id:
        parts.append(event.client_id)
    if event.message:
        parts.append(event.message)
    shown = {k: v for k, v in event.values.items() if not k.endswith("_s")}
    if shown:
        parts.append(_metrics_text(shown))
    return "  ".join(parts)


class WatchView:
    """Rich progress view of a run: rounds committed of total, uploads received of selected,
    latest accuracy; one printed line per event."""

    def __init__(self, console: Console, total_rounds: int, committed: int, enabled: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self.rounds_task = self.progress.add_task(
            "rounds", total=max(total_rounds, 1), completed=committed
        )
        self.round_task = self.progress.add_task("uploads", total=1, completed=0, visible=False)
        self.accuracy = ""

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def apply(self, event: admin_pb2.Event) -> None:
        """Update the bars from one event and print its line."""
        values = dict(event.values)
        kind = event.kind
        if kind == "round_started":
            self.progress.update(
                self.round_task,
                description=f"round {event.round} uploads",
                total=max(values.get("selected", 1.0), 1.0),
                completed=0,
                visible=True,
            )
        elif kind == "upload_accepted":
            self.progress.advance(self.round_task)
        elif kind == "round_committed":
            accuracy = {k: v for k, v in values.items() if "acc" in k}
            if accuracy:
                self.accuracy = " " + _metrics_text(accuracy)
            self.progress.update(
                self.rounds_task, completed=event.round, description="rounds" + self.accuracy
            )
            self.progress.update(self.round_task, visible=False)
        elif kind == "round_failed":
            self.progress.update(self.round_task, visible=False)
        elif kind == "policy_updated":
            match = re.search(r"total_rounds=(\d+)", event.message)
            if match:
                self.progress.update(self.rounds_task, total=max(int(match.group(1)), 1))
        self.progress.console.print(event_line(event), markup=False, highlight=False)


@admin_app.command("watch")
def watch(
    ctx: typer.Context,
    follow: Annotated[
        bool, typer.Option("--follow/--no-follow", help="Keep streaming new events.")
    ] = True,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Progress bars (TTY only).")
    ] = True,
    json_output: JsonOpt = False,
) -> None:
    """Live event stream with round progress, uploads received/selected and accuracy; ends
    when the run completes, stops or fails (Ctrl-C to leave earlier)."""
    from crossfed.v1 import admin_pb2

    with _session(ctx) as (state, session):
        status_response = session.call("GetStatus", admin_pb2.GetStatusRequest())
        request = admin_pb2.StreamEventsRequest(after_event_id=0, follow=follow)
        stream = session.stub.StreamEvents(request)
        try:
            if state.json_output:
                with session.stream_errors():
                    for event in stream:
                        typer.echo(json.dumps(event_dict(event), sort_keys=True))
                        if follow and event.kind in TERMINAL_EVENTS:
                            break
                return
            enabled = progress and state.console.is_terminal
            view = WatchView(
                state.console,
                int(status_response.total_rounds),
                0,
                enabled,
            )
            with view, session.stream_errors():
                for event in stream:
                    view.apply(event)
                    if follow and event.kind in TERMINAL_EVENTS:
                        break
        finally:
            stream.cancel()
