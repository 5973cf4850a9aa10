"""Assemble and run the coordination server from a `ServerConfig`: state store, checkpoints,
initial model, round engine, Coordinator servicer, gRPC server, the tick thread that makes
deadlines fire, and graceful shutdown."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from crossfed.common.config import CHUNK_ENVELOPE_BYTES, ServerConfig
from crossfed.common.crypto.grpc_credentials import server_credentials, warn_insecure
from crossfed.common.crypto.identity import NonceReplayCache, RequestVerifier
from crossfed.common.crypto.nonce_journal import NonceJournal, NonceJournalError
from crossfed.common.crypto.rpc_auth import ServerAuthInterceptor
from crossfed.common.privacy.projection_dp import ProjectionMandate
from crossfed.server.admin_servicer import AdminServicer, ensure_admin_credential
from crossfed.server.calibration_round import CalibrationStep, ccvr_calibration_step
from crossfed.server.checkpoints import CheckpointStore
from crossfed.server.coordinator_servicer import CoordinatorServicer
from crossfed.server.credential_store import CREDENTIALS_DB, SqliteCredentialStore
from crossfed.server.errors import ConfigurationError, StateStoreError
from crossfed.server.federation_contract import FederationContract
from crossfed.server.grpc_server import RunningServer, start_grpc_server
from crossfed.server.metrics import ServerMetrics
from crossfed.server.model_bootstrap import build_initial_model, model_config_digest
from crossfed.server.model_bundles import BundleStore
from crossfed.server.privacy_ledger import LEDGER_FILE, PrivacyLedger
from crossfed.server.projection_exchange import ProjectionSpec
from crossfed.server.projection_privacy import ProjectionPrivacy
from crossfed.server.round_engine import RoundEngine
from crossfed.server.round_policy import RoundPolicy
from crossfed.server.sd_admission import SDRequirement
from crossfed.server.state.base import StateStore
from crossfed.server.state.factory import open_state_store, prepare_state_dir
from crossfed.server.state.records import TERMINAL_RUN_STATES, RunRecord
from crossfed.server.strategies.base import Strategy
from crossfed.server.strategies.central_dp import CentralDPStrategy
from crossfed.server.strategies.registry import make_strategy
from crossfed.server.strategies.robust_aggregation import RobustStrategy
from crossfed.server.update_bound import UpdateBound
from crossfed.server.upload_keys import load_or_create_upload_key
from crossfed.server.upload_receiver import UploadPolicy

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
NONCES = "nonces.journal"


#: ServerOptions override fields and the ServerConfig setting each one replaces.
_CONFIG_OVERRIDES = {
    "allow_unencrypted_uploads": ("allow_unencrypted_uploads",),
    "seed": ("seed",),
    "keep_checkpoints": ("keep_checkpoints",),
    "start_timeout_s": ("rounds", "start_timeout_s"),
    "client_timeout_s": ("rounds", "client_timeout_s"),
    "heartbeat_interval_ms": ("rounds", "heartbeat_ms"),
    "wait_after_min_s": ("rounds", "wait_after_min_s"),
    "torch_threads": ("torch_threads",),
}


@dataclass(frozen=True)
class ServerOptions:
    """Run-time switches that are not part of `ServerConfig`, plus overrides of config values
    for code that embeds the server (tests, benchmarks): an override left None keeps the
    config's value, so defaults live in one place, the config model."""

    tick_interval_s: float = 0.25
    exit_when_done: bool = False
    done_linger_s: float = 5.0
    shutdown_grace_s: float = 5.0
    auto_start: bool = True  # False: the run waits idle for `crossfed admin start`
    # overrides (None: the config's value)
    allow_unencrypted_uploads: bool | None = None
    seed: int | None = None
    keep_checkpoints: int | None = None
    start_timeout_s: float | None = None
    client_timeout_s: float | None = None
    heartbeat_interval_ms: int | None = None
    wait_after_min_s: float | None = None
    torch_threads: int | None = None

    def apply_to(self, config: ServerConfig) -> ServerConfig:
        """``config`` with the overrides that are set, validated like the config file."""
        overrides = {n: getattr(self, n) for n in _CONFIG_OVERRIDES if getattr(self, n) is not None}
        if not overrides:
            return config
        data = config.model_dump()
        for name, value in overrides.items():
            path = _CONFIG_OVERRIDES[name]
            section = data
            for key in path[:-1]:
                section = section[key]
            section[path[-1]] = value
        return ServerConfig.model_validate(data)


def check_strategy_fits(
    strategy: Strategy, state: Mapping[str, torch.Tensor], config: ServerConfig
) -> None:
    """Refuse a buffering strategy whose round of min_clients uploads cannot fit its memory
    budget (strategy.buffer_budget_mb), before the server opens any state."""
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    need = strategy.peak_bytes(model_bytes, config.rounds.min_clients)
    budget = int(config.strategy.buffer_budget_mb * 2**20)
    if isinstance(strategy, RobustStrategy) and need > budget:
        raise ConfigurationError(
            f"strategy {strategy.name!r} buffers every upload: {config.rounds.min_clients} "
            f"clients x {model_bytes:,} model bytes needs {need:,} bytes, over "
            f"strategy.buffer_budget_mb={config.strategy.buffer_budget_mb:g} ({budget:,} bytes); "
            "raise the budget, lower rounds.min_clients, or use a streaming strategy (fedavg)"
        )


def strategy_from_config(config: ServerConfig) -> Strategy:
    """The config's strategy, behind central DP when `privacy.central_dp` is on."""
    try:
        strategy = make_strategy(config.strategy)
    except ValueError as exc:
        raise ConfigurationError(f"strategy: {exc}") from exc
    privacy = config.privacy
    if not privacy.central_dp:
        return strategy
    if isinstance(strategy, RobustStrategy):
        raise ConfigurationError(
            f"privacy.central_dp: its noise is calibrated to a weighted mean's sensitivity; "
            f"strategy {strategy.name!r} is not a mean, so the noise would not give the "
            "stated epsilon. Use a mean-based strategy (fedavg, fedavgm, fedadam, ...) with it"
        )
    return CentralDPStrategy(strategy, privacy.central_dp_clip, privacy.central_dp_noise_multiplier)


def projection_privacy_from_config(config: ServerConfig, state_dir: Path) -> ProjectionPrivacy:
    """The projection-DP mandate (on by default) and the per-client ledger in ``state_dir``."""
    privacy = config.privacy
    ledger = PrivacyLedger(state_dir / LEDGER_FILE, privacy.delta)
    if not privacy.projection_dp:
        log.warning(
            "privacy.projection_dp is off: clients' exact projections are taken and no epsilon "
            "is accounted (privacy.epsilon_budget does not apply)"
        )
        return ProjectionPrivacy(None, ledger, privacy.clip)
    if privacy.noise_multiplier <= 0:
        raise ConfigurationError(
            "privacy.projection_dp is on but privacy.noise_multiplier is 0: the server would "
            "mandate no noise; set a noise multiplier > 0 or turn projection_dp off"
        )
    mandate = ProjectionMandate(
        privacy.noise_multiplier, privacy.clip, privacy.delta, privacy.epsilon_budget
    )
    return ProjectionPrivacy(mandate, ledger)


def update_bound_from_config(config: ServerConfig) -> UpdateBound | None:
    """The per-client update bound (on by default; ``update_bound.max_norm_ratio: null`` off)."""
    ratio = config.update_bound.max_norm_ratio
    return None if ratio is None else UpdateBound(ratio)


def calibration_step_from_config(config: ServerConfig, model_source: str) -> CalibrationStep | None:
    """The calibration round after the last training round, when the model asks for it."""
    if not config.model.calibration_paths():
        return None
    if model_source != "CrossModalNet":
        raise ConfigurationError(
            "model.calibrate_image_classifier / calibrate_text_classifier need the real "
            f"network; the {model_source} model has no calibration layers"
        )
    return ccvr_calibration_step(config.model, config.seed)


def round_policy_from_config(config: ServerConfig, auto_start: bool = True) -> RoundPolicy:
    """Map the config's `rounds` section onto the engine's policy."""
    rounds = config.rounds
    return RoundPolicy(
        total_rounds=rounds.rounds,
        min_clients=rounds.min_clients,
        fraction=rounds.fraction,
        round_deadline_s=rounds.round_deadline_s,
        straggler_fraction=rounds.straggler_cutoff,
        wait_after_min_s=rounds.wait_after_min_s,
        start_timeout_s=rounds.start_timeout_s,
        max_round_attempts=rounds.max_retries_on_failed_round + 1,
        client_timeout_s=rounds.client_timeout_s,
        heartbeat_interval_ms=rounds.heartbeat_ms,
        poll_after_ms=rounds.heartbeat_ms,
        selection_seed=config.seed,
        auto_start=auto_start,
    )


def _stored_run(store: StateStore) -> Callable[[], RunRecord]:
    """The committed run record (what a bundle reports: round, run id, epsilon)."""

    def run() -> RunRecord:
        record = store.get_run()
        if record is None:
            raise StateStoreError("the state store holds no run")
        return record

    return run


@dataclass
class CoordinatorServer:
    """One coordination server process: build with `create`, then `start` / `stop`."""

    config: ServerConfig
    options: ServerOptions
    engine: RoundEngine
    servicer: CoordinatorServicer
    credential_store: SqliteCredentialStore | None
    admin: AdminServicer | None = None
    metrics: ServerMetrics | None = None
    running: RunningServer | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _ticker: threading.Thread | None = None

    @classmethod
    def create(cls, config: ServerConfig, options: ServerOptions) -> CoordinatorServer:
        """Open (or resume) the state in ``config.state_dir`` and build the servicer; the
        server's ``config`` is ``config`` with the options' overrides applied."""
        config = options.apply_to(config)
        strategy = strategy_from_config(config)  # a bad strategy section fails before any I/O
        state_dir = prepare_state_dir(Path(config.state_dir))
        torch.set_num_threads(config.torch_threads)
        model = build_initial_model(config.model, config.seed)
        log.info("initial model: %s, %d tensors", model.source, len(model.state))
        check_strategy_fits(strategy, model.state, config)
        epsilon_budget = config.privacy.epsilon_budget or 0.0
        store = open_state_store(state_dir)
        checkpoints = CheckpointStore(state_dir / CHECKPOINT_DIR, keep_last=config.keep_checkpoints)
        contract = FederationContract(
            config.class_names, store, configured=config.classes_configured
        )
        bundles = None
        if model.source == "CrossModalNet":  # an injected test model has no bundle form
            bundles = BundleStore(
                checkpoints, config.model, contract, config.privacy.delta, _stored_run(store)
            )
        engine = RoundEngine(
            store,
            checkpoints,
            model.state,
            model.module_of,
            round_policy_from_config(config, options.auto_start),
            projection_spec=ProjectionSpec(
                config.model.num_classes, config.model.text_dim, config.model.image_dim
            ),
            model_config_digest=model_config_digest(config.model),
            epsilon_budget=epsilon_budget,
            projection_privacy=projection_privacy_from_config(config, state_dir),
            strategy=strategy,
            central_dp_delta=config.privacy.delta,
            calibration=calibration_step_from_config(config, model.source),
            contract=contract,
            bundles=bundles,
            sd_requirement=SDRequirement.of(config.model),
            update_bound=update_bound_from_config(config),
        )
        insecure = config.tls.insecure
        credential_store = None if insecure else SqliteCredentialStore(state_dir / CREDENTIALS_DB)
        if credential_store is not None:
            ensure_admin_credential(credential_store, state_dir)
        policy = UploadPolicy(
            max_payload_bytes=config.transport.max_payload_bytes,
            allow_unencrypted=config.allow_unencrypted_uploads,
            upload_key=load_or_create_upload_key(state_dir),
            hash_encrypted_uploads=config.transport.hash_encrypted_uploads,
        )
        servicer = CoordinatorServicer(
            engine,
            policy,
            chunk_size=config.transport.chunk_size,
            model_config_json=config.model.model_dump_json(),
            authenticated=not insecure,
            credential_store=credential_store,
            upload_idle_timeout_s=config.transport.upload_idle_timeout_s,
            bind_certificate=config.tls.mtls,
        )
        admin = AdminServicer(
            engine, config, authenticated=not insecure, credential_store=credential_store
        )
        metrics = ServerMetrics(engine)
        return cls(config, options, engine, servicer, credential_store, admin, metrics)

    def start(self) -> int:
        """Start serving; returns the bound port."""
        interceptors = []
        creds = None
        if self.config.tls.insecure:
            warn_insecure(log)
        else:
            assert self.credential_store is not None
            creds = server_credentials(
                self.config.tls.cert_dir, require_client_auth=self.config.tls.mtls
            )
            interceptors.append(
                ServerAuthInterceptor(
                    RequestVerifier(self.credential_store, replay_cache=self._replay_cache()),
                    bind_certificate=self.config.tls.mtls,
                )
            )
        if self.metrics is not None:
            interceptors.append(self.metrics.interceptor)
            host = self.config.listen.rsplit(":", 1)[0].strip("[]")
            self.metrics.start(self.config.metrics_port, host)
        self.running = start_grpc_server(
            self.servicer,
            self.config.listen,
            max_message_bytes=self.config.transport.max_message_bytes,
            frame_bytes=self.config.transport.chunk_size + CHUNK_ENVELOPE_BYTES,
            server_credentials=creds,
            interceptors=interceptors,
            extra_services=[self.admin.registration()] if self.admin is not None else [],
        )
        self._ticker = threading.Thread(target=self._tick_loop, name="crossfed-tick", daemon=True)
        self._ticker.start()
        return self.running.port

    def _replay_cache(self) -> NonceReplayCache:
        """The nonces of signed requests, journaled in the state dir: a request used before a
        restart is refused after it."""
        try:
            return NonceReplayCache(journal=NonceJournal(Path(self.config.state_dir) / NONCES))
        except NonceJournalError as exc:
            raise ConfigurationError(str(exc)) from None

    def _tick_loop(self) -> None:
        done_since: float | None = None
        while not self._stop.wait(self.options.tick_interval_s):
            try:
                self.engine.tick()
            except Exception:  # keep ticking; a failing tick is logged, never silent
                log.exception("round engine tick failed")
            if self.options.exit_when_done and self.engine.run.state in TERMINAL_RUN_STATES:
                now = self.engine.clock()
                done_since = done_since or now
                if now - done_since >= self.options.done_linger_s:
                    self._stop.set()

    def wait(self) -> None:
        """Block until `stop` is called (signal handler) or the run ended with exit_when_done."""
        while not self._stop.wait(0.5):
            pass

    def request_stop(self) -> None:
        """Ask `wait` to return (safe from a signal handler)."""
        self._stop.set()

    def stop(self) -> None:
        """Graceful shutdown: stop accepting RPCs, let in-flight ones finish, close the DB."""
        self._stop.set()
        if self.admin is not None:
            self.admin.close()
        if self.running is not None:
            self.running.stop(self.options.shutdown_grace_s)
            self.running = None
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        if self.metrics is not None:
            self.metrics.stop()
        if not self.engine.wait_idle(self.options.shutdown_grace_s):  # a commit in flight
            log.warning("a round commit was still running at shutdown; it is re-run on restart")
        self.engine.store.close()
        if self.credential_store is not None:
            self.credential_store.close()
