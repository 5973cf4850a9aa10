"""The Admin gRPC service (what `crossfed admin` calls): status, clients, rounds, run control,
validated live config changes, model export, client removal, enrollment tokens and the event
stream. A thin shell over the `RoundEngine`; authentication is the interceptor's job (admin
credential required), except in insecure mode where only loopback callers are served."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import grpc
from crossfed.common.config import ServerConfig
from crossfed.common.crypto.identity import (
    ClientCredential,
    CredentialFileError,
    CredentialStore,
    EnrollmentError,
    PrincipalRole,
    create_admin_credential,
    create_enrollment_token,
)
from crossfed.common.crypto.rpc_auth import NotAuthenticatedError, authenticated_identity
from crossfed.server.errors import (
    CheckpointError,
    ConfigurationError,
    ServerError,
    StatusKind,
)
from crossfed.server.round_engine import RoundEngine
from crossfed.server.round_policy import RoundPolicy
from crossfed.server.state.records import (
    ROUND_COMMITTED,
    RUN_IDLE,
    RUN_PAUSED,
    RUN_RUNNING,
    EventRecord,
)
from crossfed.v1 import admin_pb2, admin_pb2_grpc, common_pb2
from pydantic import ValidationError

from crossfed import __version__

log = logging.getLogger(__name__)

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
ADMIN_CREDENTIAL_FILE = "admin.credential.json"
DEFAULT_TOKEN_TTL_S = 24 * 3600.0
EVENT_PAGE = 500
_FOLLOW_WAIT_S = 0.5

#: Keys `UpdateConfig` may change while a run is live, with what each does. Everything else
#: (addresses, TLS, model shape, state dir, transport limits) needs a restart.
LIVE_CONFIG_KEYS: dict[str, str] = {
    "rounds.rounds": "total rounds of the run (not below the rounds already committed)",
    "rounds.min_clients": "updates a round needs to commit",
    "rounds.fraction": "share of online clients selected per round",
    "rounds.round_deadline_s": "deadline of rounds opened from now on",
    "rounds.straggler_cutoff": "share of selected clients after which a round may close",
    "rounds.max_retries_on_failed_round": "retries of a failed round before the run fails",
    "privacy.epsilon_budget": "projection-DP epsilon budget ('none' removes it)",
}
_NONE_WORDS = frozenset({"", "none", "null"})


class AdminRequestError(ServerError):
    """An admin request is malformed (unknown key, bad value, unknown round)."""

    status = StatusKind.INVALID_ARGUMENT


class LiveConfigError(AdminRequestError):
    """A live config change names a key outside the whitelist or a value the model rejects."""


class AdminNotFoundError(ServerError):
    """The client or checkpoint an admin request names does not exist."""

    status = StatusKind.NOT_FOUND


class AdminPreconditionError(ServerError):
    """The request is valid but not in the run's current state (e.g. resume when running)."""

    status = StatusKind.FAILED_PRECONDITION


class InsecureAdminRefusedError(ServerError):
    """Insecure mode serves admin RPCs to loopback callers only (there is no credential)."""

    status = StatusKind.PERMISSION_DENIED


# --------------------------------------------------------------------------- admin credential


def ensure_admin_credential(store: CredentialStore, state_dir: Path) -> Path:
    """Create ``state_dir/admin.credential.json`` (0600) at first start; keep a valid one.

    A file whose principal is missing, revoked, not an admin or holds another secret than the
    store (e.g. the credential database was replaced) is re-keyed and rewritten.
    """
    path = Path(state_dir) / ADMIN_CREDENTIAL_FILE
    if path.exists():
        try:
            held = ClientCredential.load(path)
        except CredentialFileError as exc:
            raise ConfigurationError(
                f"admin credential {path} is unusable ({exc}); delete it to get a new one"
            ) from None
        stored = store.get_credential(held.client_id)
        if (
            stored is not None
            and not stored.revoked
            and stored.role is PrincipalRole.ADMIN
            and stored.secret == held.secret
        ):
            return path
        log.warning("admin credential %s does not match the credential store; re-keying", path)
        credential = create_admin_credential(store, held.client_id)
    else:
        credential = create_admin_credential(store)
    credential.save(path)
    log.info("admin credential for %r written to %s (mode 0600)", credential.client_id, path)
    return path


# --------------------------------------------------------------------------- live config


def _set_dotted(data: dict[str, Any], key: str, value: object) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def _get_dotted(model: ServerConfig, key: str) -> object:
    node: object = model
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate_live_config(
    config: ServerConfig, values: Mapping[str, str]
) -> tuple[ServerConfig, dict[str, str]]:
    """``config`` with ``values`` (dotted key -> text) applied and validated by the pydantic
    model; returns (new config, applied values as normalised text). Raises LiveConfigError
    (nothing applied) for an empty request, a key outside LIVE_CONFIG_KEYS or a bad value."""
    if not values:
        raise LiveConfigError("no KEY=VALUE given; live keys: " + ", ".join(LIVE_CONFIG_KEYS))
    unknown = sorted(k for k in values if k not in LIVE_CONFIG_KEYS)
    if unknown:
        raise LiveConfigError(
            f"{', '.join(unknown)} cannot be changed while the server runs; live keys: "
            + ", ".join(LIVE_CONFIG_KEYS)
        )
    data = config.model_dump()
    for key, raw in values.items():
        optional = key == "privacy.epsilon_budget"
        value: object = None if optional and raw.strip().lower() in _NONE_WORDS else raw.strip()
        _set_dotted(data, key, value)
    try:
        new = ServerConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            where = ".".join(str(p) for p in error["loc"])
            problems.append(f"{where}: {error['msg']} (got {error['input']!r})")
        raise LiveConfigError("invalid value: " + "; ".join(problems)) from None
    applied = {key: str(_get_dotted(new, key)) for key in values}
    return new, applied


def policy_for(config: ServerConfig, current: RoundPolicy) -> RoundPolicy:
    """``current`` with the config's round settings (CLI-only timings are kept)."""
    rounds = config.rounds
    try:
        return replace(
            current,
            total_rounds=rounds.rounds,
            min_clients=rounds.min_clients,
            fraction=rounds.fraction,
            round_deadline_s=rounds.round_deadline_s,
            straggler_fraction=rounds.straggler_cutoff,
            max_round_attempts=rounds.max_retries_on_failed_round + 1,
        )
    except ConfigurationError as exc:
        raise LiveConfigError(str(exc)) from None


# --------------------------------------------------------------------------- servicer


def _abort(context: grpc.ServicerContext, exc: ServerError) -> NoReturn:
    context.abort(getattr(grpc.StatusCode, exc.status.value), str(exc))
    raise AssertionError("unreachable: context.abort raises")


def _is_loopback_peer(peer: str) -> bool:
    """gRPC peer strings: 'ipv4:127.0.0.1:5', 'ipv6:[::1]:5', 'unix:/path'."""
    if peer.startswith("unix:"):
        return True
    if peer.startswith("ipv4:"):
        return peer[5:].startswith("127.")
    if peer.startswith("ipv6:"):
        host = peer[5:].rsplit(":", 1)[0].strip("[]")
        return host in ("::1", "0:0:0:0:0:0:0:1") or host.startswith("::ffff:127.")
    return False


def event_message(event: EventRecord) -> admin_pb2.Event:
    """EventRecord -> crossfed.v1.Event."""
    return admin_pb2.Event(
        event_id=event.event_id,
        time_unix_s=event.time_unix_s,
        kind=event.kind,
        round=event.round,
        client_id=event.client_id,
        message=event.message,
        values=event.values,
    )


@dataclass
class AdminOptions:
    """Admin-service settings beyond the config."""

    chunk_size: int = 1024 * 1024
    token_ttl_s: float = DEFAULT_TOKEN_TTL_S
    loopback_only_when_insecure: bool = True


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """crossfed.v1.Admin over a `RoundEngine` and the live `ServerConfig`."""

    def __init__(
        self,
        engine: RoundEngine,
        config: ServerConfig,
        *,
        authenticated: bool,
        credential_store: CredentialStore | None = None,
        options: AdminOptions | None = None,
    ) -> None:
        self.engine = engine
        self.authenticated = authenticated
        self.credential_store = credential_store
        self.options = options or AdminOptions(chunk_size=config.transport.chunk_size)
        self._config = config
        self._config_lock = threading.Lock()
        self._started = time.monotonic()
        self._closing = threading.Event()

    @property
    def config(self) -> ServerConfig:
        """The live configuration (after `UpdateConfig` changes)."""
        return self._config

    def registration(self) -> tuple[object, str]:
        """(adder, service name) for `start_grpc_server(extra_services=...)`."""

        def add(server: grpc.Server) -> None:
            admin_pb2_grpc.add_AdminServicer_to_server(self, server)

        return add, ADMIN_SERVICE

    def close(self) -> None:
        """End open event streams (server shutdown)."""
        self._closing.set()
        with self.engine.events_changed:
            self.engine.events_changed.notify_all()

    # -- helpers -------------------------------------------------------------------------
    def _admin(self, context: grpc.ServicerContext, action: str, *, query: bool = False) -> str:
        """Who is calling (for the audit log: changes at INFO, read-only queries at DEBUG so a
        polling dashboard does not flood it); refuses non-loopback callers when insecure."""
        if self.authenticated:
            try:
                who = authenticated_identity(context).client_id
            except NotAuthenticatedError:
                _abort(context, InsecureAdminRefusedError("admin call without authentication"))
        else:
            peer = context.peer() or ""
            if self.options.loopback_only_when_insecure and not _is_loopback_peer(peer):
                _abort(
                    context,
                    InsecureAdminRefusedError(
                        "this server runs in insecure mode: admin RPCs are served to loopback "
                        "callers only; use TLS and an admin credential for remote admin"
                    ),
                )
            who = f"insecure:{peer}"
        log.log(logging.DEBUG if query else logging.INFO, "admin %s: %s", who, action)
        return who

    # -- queries -------------------------------------------------------------------------
    def GetStatus(
        self, request: admin_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> admin_pb2.GetStatusResponse:
        self._admin(context, "status", query=True)
        engine = self.engine
        with engine.events_changed:  # one consistent snapshot (the engine's re-entrant lock)
            run = engine.run
            opened = engine.open_round
            clients = engine.clients()
            last_metrics: dict[str, float] = {}
            for record in engine.store.list_rounds():
                if record.state == ROUND_COMMITTED:
                    last_metrics = dict(record.metrics)
                    break
            budget = engine.epsilon_budget
        by_state: dict[str, int] = {}
        for client in clients:
            by_state[client.state] = by_state.get(client.state, 0) + 1
        return admin_pb2.GetStatusResponse(
            run_id=run.run_id,
            run_state=run.state,
            current_round=opened.round if opened is not None else run.last_committed_round,
            total_rounds=run.total_rounds,
            last_committed_round=run.last_committed_round,
            clients_by_state=by_state,
            epsilon_spent=run.epsilon_spent,
            epsilon_budget=budget,
            last_metrics=common_pb2.Metrics(values=last_metrics),
            server_version=__version__,
            uptime_s=time.monotonic() - self._started,
            strategy=engine.strategy.name,
            strategy_params=self.config.strategy.params(),
            central_dp=self.config.privacy.central_dp,
        )

    def ListClients(
        self, request: admin_pb2.ListClientsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListClientsResponse:
        self._admin(context, "list clients", query=True)
        return admin_pb2.ListClientsResponse(
            clients=[
                admin_pb2.ClientInfo(
                    client_id=c.client_id,
                    modality=c.modality,  # type: ignore[arg-type]
                    num_samples=c.num_samples,
                    state=c.state,
                    last_seen_unix_s=c.last_seen_unix_s,
                    last_round=c.last_round,
                    rounds_completed=c.rounds_completed,
                    num_paired=c.num_paired,
                    num_text_only=c.num_text_only,
                    num_image_only=c.num_image_only,
                )
                for c in self.engine.clients()
            ]
        )

    def ListRounds(
        self, request: admin_pb2.ListRoundsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListRoundsResponse:
        self._admin(context, "list rounds", query=True)
        records = self.engine.store.list_rounds(int(request.limit))
        return admin_pb2.ListRoundsResponse(
            rounds=[
                admin_pb2.RoundInfo(
                    round=r.round,
                    attempt=r.attempt,
                    state=r.state,
                    started_unix_s=r.started_unix_s,
                    ended_unix_s=r.ended_unix_s,
                    selected=len(r.selected),
                    received=r.received,
                    num_samples=r.num_samples,
                    metrics=common_pb2.Metrics(values=r.metrics),
                    message=r.message,
                )
                for r in records
            ]
        )

    # -- run control ---------------------------------------------------------------------
    def _apply_config_locked(self, values: Mapping[str, str]) -> dict[str, str]:
        """Validate everything first, then change engine policy and budget (all or nothing).
        Caller holds ``_config_lock`` and then the engine lock (always in that order)."""
        new, applied = validate_live_config(self._config, values)
        policy = policy_for(new, self.engine.policy)
        self.engine.update_policy(policy)
        self.engine.epsilon_budget = new.privacy.epsilon_budget or 0.0
        self._config = new
        return applied

    def StartRun(
        self, request: admin_pb2.StartRunRequest, context: grpc.ServicerContext
    ) -> admin_pb2.RunControlResponse:
        self._admin(context, "start run")
        values: dict[str, str] = {}
        if request.rounds:
            values["rounds.rounds"] = str(request.rounds)
        if request.min_clients:
            values["rounds.min_clients"] = str(request.min_clients)
        if request.fraction:
            values["rounds.fraction"] = repr(request.fraction)
        if request.round_deadline_s:
            values["rounds.round_deadline_s"] = repr(request.round_deadline_s)
        try:
            with self._config_lock, self.engine.events_changed:
                state = self.engine.run.state
                if state != RUN_IDLE:
                    hint = {
                        RUN_RUNNING: "it is already running (change settings with `set`)",
                        RUN_PAUSED: "it is paused (use `resume`)",
                    }.get(state, f"it is {state}; a finished run cannot be restarted")
                    raise AdminPreconditionError(f"cannot start the run: {hint}")
                if values:
                    self._apply_config_locked(values)
                run = self.engine.start()
        except ServerError as exc:
            _abort(context, exc)
        applied = ", ".join(f"{k}={v}" for k, v in values.items())
        return admin_pb2.RunControlResponse(
            run_state=run.state,
            message=f"run {run.run_id} started" + (f" with {applied}" if applied else ""),
        )

    def PauseRun(
        self, request: admin_pb2.RunControlRequest, context: grpc.ServicerContext
    ) -> admin_pb2.RunControlResponse:
        self._admin(context, "pause run")
        try:
            run = self.engine.pause(request.reason)
        except ServerError as exc:
            _abort(context, exc)
        return admin_pb2.RunControlResponse(
            run_state=run.state, message="no new round starts; an open round finishes"
        )

    def ResumeRun(
        self, request: admin_pb2.RunControlRequest, context: grpc.ServicerContext
    ) -> admin_pb2.RunControlResponse:
        self._admin(context, "resume run")
        try:
            run = self.engine.resume(request.reason)
        except ServerError as exc:
            _abort(context, exc)
        return admin_pb2.RunControlResponse(run_state=run.state, message="resumed")

    def StopRun(
        self, request: admin_pb2.RunControlRequest, context: grpc.ServicerContext
    ) -> admin_pb2.RunControlResponse:
        self._admin(context, "stop run")
        before = self.engine.run.state
        run = self.engine.stop(request.reason)
        message = run.message if before != run.state else f"run was already {before}"
        return admin_pb2.RunControlResponse(run_state=run.state, message=message)

    def UpdateConfig(
        self, request: admin_pb2.UpdateConfigRequest, context: grpc.ServicerContext
    ) -> admin_pb2.UpdateConfigResponse:
        self._admin(context, f"update config {sorted(request.values)}")
        try:
            with self._config_lock, self.engine.events_changed:
                applied = self._apply_config_locked(dict(request.values))
        except ServerError as exc:
            _abort(context, exc)
        log.info("live config changed: %s", applied)
        return admin_pb2.UpdateConfigResponse(applied=applied)

    # -- model export ----------------------------------------------------------------------
    def ExportModel(
        self, request: admin_pb2.ExportModelRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.TensorChunk]:
        self._admin(context, f"export model round {request.round}", query=True)
        last = self.engine.run.last_committed_round
        version = last if request.round == 0 else int(request.round)
        try:
            if version > last:
                raise AdminNotFoundError(
                    f"round {version} is not committed; the latest committed round is {last}"
                )
            bundles = self.engine.bundles
            if bundles is None:
                raise AdminRequestError(
                    "this server runs the stand-in model, which has no model bundle"
                )
            try:
                payload = bundles.read(version)
            except CheckpointError as exc:
                raise AdminNotFoundError(str(exc)) from None
        except ServerError as exc:
            _abort(context, exc)
        size = len(payload)
        cs = self.options.chunk_size
        total = max(1, -(-size // cs))
        digest = hashlib.sha256(payload).digest()
        view = memoryview(payload)
        for index in range(total):
            yield common_pb2.TensorChunk(
                index=index,
                total=total,
                data=bytes(view[index * cs : (index + 1) * cs]),
                payload_sha256=digest,
                payload_size=size,
                round=version,
            )

    # -- clients and enrollment ----------------------------------------------------------
    def RemoveClient(
        self, request: admin_pb2.RemoveClientRequest, context: grpc.ServicerContext
    ) -> admin_pb2.RemoveClientResponse:
        who = self._admin(context, f"remove client {request.client_id!r}")
        client_id = request.client_id
        try:
            if not client_id:
                raise AdminRequestError("remove-client needs a client id")
            store = self.credential_store
            stored = store.get_credential(client_id) if store is not None else None
            if stored is not None and stored.role is PrincipalRole.ADMIN:
                raise AdminRequestError(
                    f"{client_id!r} is an admin principal, not a client; it is not removed"
                )
            removed = self.engine.remove_client(client_id)
            active = store is not None and stored is not None and not stored.revoked
            revoked = store.revoke(client_id) if store is not None and active else False
            if not removed and not revoked:
                raise AdminNotFoundError(f"client {client_id!r} is not known to this server")
        except ServerError as exc:
            _abort(context, exc)
        if revoked:
            self.engine.record_event("credential_revoked", client_id=client_id, message=who)
        return admin_pb2.RemoveClientResponse(removed=True)

    def CreateEnrollmentToken(
        self, request: admin_pb2.CreateEnrollmentTokenRequest, context: grpc.ServicerContext
    ) -> admin_pb2.CreateEnrollmentTokenResponse:
        self._admin(context, "create enrollment token")
        try:
            if self.credential_store is None:
                raise AdminPreconditionError(
                    "this server runs without client authentication (insecure mode); "
                    "clients need no enrollment token"
                )
            if request.ttl_s < 0:
                raise AdminRequestError(f"ttl must be >= 0 seconds, got {request.ttl_s}")
            try:
                issued = create_enrollment_token(
                    self.credential_store,
                    ttl_s=request.ttl_s or self.options.token_ttl_s,
                    client_id=request.client_id or None,
                )
            except EnrollmentError as exc:
                raise AdminRequestError(str(exc)) from None
        except ServerError as exc:
            _abort(context, exc)
        bound = request.client_id or ""
        self.engine.record_event(
            "enrollment_token_created",
            client_id=bound,
            message=f"expires in {(request.ttl_s or self.options.token_ttl_s):g} s",
        )
        return admin_pb2.CreateEnrollmentTokenResponse(
            token=issued.token.reveal(), expires_unix_s=issued.record.expires_at or 0.0
        )

    # -- event stream --------------------------------------------------------------------
    def StreamEvents(
        self, request: admin_pb2.StreamEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[admin_pb2.Event]:
        self._admin(context, f"stream events after {request.after_event_id}", query=True)
        # event ids are SQLite int64: a larger (uint64) cursor simply has nothing after it
        after = min(int(request.after_event_id), 2**63 - 1)
        changed = self.engine.events_changed
        while context.is_active() and not self._closing.is_set():
            with changed:
                events = self.engine.store.events_after(after, EVENT_PAGE)
                if not events:
                    if not request.follow:
                        return
                    changed.wait(_FOLLOW_WAIT_S)
                    continue
            for event in events:
                yield event_message(event)
                after = event.event_id
