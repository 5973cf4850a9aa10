"""Assemble and run one client daemon from a validated ClientConfig: thread limits, local data
(encoded once through the cache), identity (credential or stable id), TLS channel, model
worker and the reconnecting loop; prints one line per round and logs it to rounds.jsonl."""

from __future__ import annotations

import json
import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

import torch
from crossfed.client.backoff import Backoff, RetryPolicy
from crossfed.client.enrollment import enroll_with_token, load_credential, stored_client_id
from crossfed.client.errors import ClientConfigError
from crossfed.client.local_data import (
    BUILTIN_SOURCE,
    ClientModality,
    LocalData,
    LocalDataSpec,
    load_local_data,
)
from crossfed.client.local_trainer import TrainConfig
from crossfed.client.loop import ClientLoop, LoopSettings, LoopStats, RoundReport
from crossfed.client.resource_usage import limit_threads
from crossfed.client.round_worker import ModelRoundWorker, WorkerSettings
from crossfed.client.sd_recovery_step import SDClientOptions, SDRecoveryStep, usable_device
from crossfed.client.transport import CallDeadlines, ChannelOptions, ChannelSecurity, GrpcTransport
from crossfed.client.update_upload import default_encryptor_factory
from crossfed.common.config import BuiltinDataConfig, ClientConfig, ManifestDataConfig
from crossfed.common.crypto.identity import ClientCredential
from crossfed.common.model.model_errors import StableDiffusionSetupError
from crossfed.common.model.sd_trainable import checkpoint_digest

log = logging.getLogger(__name__)

ROUND_LOG_FILE = "rounds.jsonl"
DEFAULT_ROUND_THREADS = 1


@dataclass(frozen=True)
class DaemonOptions:
    """Settings of the daemon that are not part of the shared ClientConfig schema."""

    state_dir: Path
    data_file: Path | None = None  # pre-encoded EmbeddingSet (.safetensors), overrides data
    holdout_fraction: float = 0.2
    text_encoder: str = "minilm"
    image_encoder: str = "cnn"
    give_up_after_s: float | None = 600.0
    share_projections: bool = True
    share_calibration_stats: bool = True  # calibration round (un-noised class statistics)
    progress: bool = True
    max_rounds: int | None = None  # leave after this many completed rounds (tests, demos)


def data_spec_from_config(config: ClientConfig, options: DaemonOptions) -> LocalDataSpec:
    """Translate the config's data section (plus daemon options) into a LocalDataSpec."""
    data = config.data
    common = {
        "holdout_fraction": options.holdout_fraction,
        "text_encoder": options.text_encoder,
        "image_encoder": options.image_encoder,
    }
    if isinstance(data, ManifestDataConfig):
        return LocalDataSpec(
            source=str(data.path),
            class_names=tuple(data.class_names) if data.class_names else None,
            skip_bad_rows=data.skip_bad_rows,
            **common,  # type: ignore[arg-type]
        )
    assert isinstance(data, BuiltinDataConfig)
    modality = ClientModality(data.modality)
    missing_rate = 0.0
    if (
        data.missing.mode == "per_client"
        and data.missing.rate > 0
        and modality is ClientModality.BOTH
    ):
        from crossfed.common.data.missingness import per_client_modalities

        has_text, has_image = per_client_modalities(data.num_clients, data.missing.rate, data.seed)[
            data.client_index
        ]
        if not has_image:
            modality = ClientModality.TEXT_ONLY
        elif not has_text:
            modality = ClientModality.IMAGE_ONLY
    elif data.missing.mode == "per_sample":
        missing_rate = data.missing.rate
    source = str(options.data_file) if options.data_file is not None else BUILTIN_SOURCE
    return LocalDataSpec(
        source=source,
        modality=modality,
        num_samples=data.num_samples,
        num_clients=data.num_clients,
        client_index=data.client_index,
        dirichlet_alpha=data.dirichlet_alpha,
        seed=data.seed,
        missing_rate=missing_rate,
        **common,  # type: ignore[arg-type]
    )


def _retry_policy(config: ClientConfig, options: DaemonOptions) -> RetryPolicy:
    return RetryPolicy(
        initial_delay_s=config.reconnect.initial_s,
        max_delay_s=config.reconnect.max_s,
        jitter=config.reconnect.jitter,
        give_up_after_s=options.give_up_after_s,
    )


def _security(config: ClientConfig) -> ChannelSecurity:
    if config.tls.insecure:
        return ChannelSecurity(insecure=True)
    client_name = (config.client_id or None) if config.tls.mtls else None
    if config.tls.mtls and client_name is None:
        raise ClientConfigError("mTLS needs client_id (the name of this client's certificate)")
    return ChannelSecurity(cert_dir=config.tls.cert_dir, client_cert_name=client_name)


def _identity(
    config: ClientConfig,
    options: DaemonOptions,
    connect: Callable[..., GrpcTransport],
    backoff: Backoff,
) -> tuple[ClientCredential | None, str]:
    """Stored credential, or enrollment with the token, or (no auth) a stable client id."""
    state_dir = options.state_dir
    credential = (
        ClientCredential.load(config.credentials_path)
        if config.credentials_path
        else load_credential(state_dir)
    )
    if credential is None and config.enrollment_token is not None:
        plain = connect()
        try:
            credential = enroll_with_token(
                plain,
                state_dir,
                config.enrollment_token.get_secret_value(),
                config.client_id,
                backoff,
            )
        finally:
            plain.close()
    if credential is not None:
        if config.client_id and config.client_id != credential.client_id:
            raise ClientConfigError(
                f"config client_id {config.client_id!r} differs from the enrolled id "
                f"{credential.client_id!r}"
            )
        return credential, credential.client_id
    return None, stored_client_id(state_dir, config.client_id)


def _accuracies(metrics: dict[str, float]) -> str:
    """'acc local/global text 0.750/0.500 ...' for the Table I configurations the client's
    held-out rows can score (a text-only client has no image accuracy to show)."""
    parts = []
    for config, short in (("both", "both"), ("text_only", "text"), ("image_only", "image")):
        local, glob = metrics.get(f"local_acc_{config}"), metrics.get(f"global_acc_{config}")
        if local is None and glob is None:
            continue
        shown = ["-" if v is None else f"{v:.3f}" for v in (local, glob)]
        parts.append(f"{short} {shown[0]}/{shown[1]}")
    return "acc local/global " + " ".join(parts) if parts else "acc -"


def format_round(report: RoundReport) -> str:
    """The compact per-round line: round, loss, accuracies, bytes up/down, seconds."""
    m = report.metrics
    loss = m.get("loss_cls", float("nan"))
    flags = (" dup" if report.duplicate else "") + ("" if report.encrypted else " clear")
    if report.calibration:
        return (
            f"round {report.round_id:>3}  calibration statistics sent  "
            f"up {report.bytes_up / 2**20:.2f} MiB  down {report.bytes_down / 2**20:.2f} MiB  "
            f"{report.seconds:.1f} s{flags}"
        )
    return (
        f"round {report.round_id:>3}  loss {loss:.3f}  {_accuracies(m)}  "
        f"up {report.bytes_up / 2**20:.2f} MiB  down {report.bytes_down / 2**20:.2f} MiB  "
        f"{report.seconds:.1f} s  peak RSS {m.get('peak_rss_mib', float('nan')):.0f} MiB{flags}"
    )


class ClientDaemon:
    """One client process: build everything from config, then run the loop until DONE."""

    def __init__(
        self,
        config: ClientConfig,
        options: DaemonOptions,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.config = config
        self.options = options
        self.echo = echo
        self.stop_event = threading.Event()
        self.data: LocalData | None = None

    def request_stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        """Finish the current step, then leave (SIGTERM/SIGINT handler)."""
        self.stop_event.set()

    def install_signal_handlers(self) -> None:
        """Graceful stop on SIGTERM/SIGINT (main thread only)."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def _on_round(self, report: RoundReport, loop: ClientLoop) -> None:
        assert self.data is not None
        self.echo(format_round(report))
        record = {
            "round": report.round_id,
            "unix_s": time.time(),
            "seconds": report.seconds,
            "bytes_up": report.bytes_up,
            "bytes_down": report.bytes_down,
            "duplicate": report.duplicate,
            "encrypted": report.encrypted,
            "calibration": report.calibration,
            "modality": self.data.modality.value,
            "metrics": report.metrics,
        }
        with (self.options.state_dir / ROUND_LOG_FILE).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        done = len(loop.stats.rounds_completed)
        if self.options.max_rounds is not None and done >= self.options.max_rounds:
            self.stop_event.set()

    def _sd_device(self) -> str | None:
        """The device this client runs Stable Diffusion recovery on, None for none; a bad
        checkpoint directory or device fails here, before the data is encoded."""
        sd = self.config.stable_diffusion
        if sd is None:
            return None
        try:
            device = usable_device(sd.device)
            checkpoint_digest(sd.checkpoint)  # memoised: the SD step reuses it
        except StableDiffusionSetupError as exc:
            raise ClientConfigError(f"stable_diffusion: {exc}") from exc
        if device is None:
            self.echo("no CUDA device: Stable Diffusion recovery off, feature-space recovery")
        return device

    def _sd_step(self, device: str | None) -> SDRecoveryStep | None:
        """Stable Diffusion recovery over this client's raw rows (checkpoint digest now)."""
        sd = self.config.stable_diffusion
        if sd is None or device is None:
            return None
        assert self.data is not None and self.data.train_raw is not None
        from crossfed.common.data.embedding_cache import EmbeddingCache
        from crossfed.common.model.encoders import build_image_encoder

        started = time.perf_counter()
        try:
            step = SDRecoveryStep(
                SDClientOptions(sd.checkpoint, sd.device, sd.gradient_checkpointing),
                device,
                build_image_encoder(self.options.image_encoder),
                self.data.train_raw,
                self.data.holdout_raw,
                EmbeddingCache(self.config.cache_dir),
            )
        except StableDiffusionSetupError as exc:
            raise ClientConfigError(f"stable_diffusion.checkpoint: {exc}") from exc
        self.echo(
            f"Stable Diffusion recovery on {device}: checkpoint {sd.checkpoint} "
            f"(digest {step.digest[:12]}..., {time.perf_counter() - started:.1f} s)"
        )
        return step

    def run(self) -> LoopStats:
        """Load data, connect, and train until the server ends the run (or a stop request)."""
        config, options = self.config, self.options
        options.state_dir.mkdir(parents=True, exist_ok=True)
        limit_threads(config.threads)
        started = time.perf_counter()
        spec = data_spec_from_config(config, options)
        sd_device = self._sd_device()
        if sd_device is not None:
            spec = replace(spec, keep_raw=True)  # SD generates from captions, tunes on images
        self.data = load_local_data(spec, config.cache_dir, progress=options.progress)
        if config.threads is None:
            # Encoding (above) gains from every core; the round's small MLP products do not,
            # and extra intra-op threads slow them down badly when cores are shared
            # (benchmarks/client_round_resources.py: 2 threads ran a round 20x slower on a
            # loaded 2-core machine). --threads overrides this.
            torch.set_num_threads(DEFAULT_ROUND_THREADS)
        self.echo(f"local data: {self.data.description} ({time.perf_counter() - started:.1f} s)")

        policy = _retry_policy(config, options)
        backoff = Backoff(policy, random.Random())
        security = _security(config)
        deadlines = CallDeadlines()
        channel_options = ChannelOptions(max_message_bytes=config.transport.max_message_bytes)

        def connect(**kwargs: object) -> GrpcTransport:
            return GrpcTransport.connect(
                config.server_address,
                security,
                deadlines,
                options=channel_options,
                **kwargs,  # type: ignore[arg-type]
            )

        credential, client_id = _identity(config, options, connect, backoff)
        transport = connect(client_id=client_id, credential=credential)
        train = TrainConfig.from_section(
            config.train, num_threads=config.threads or DEFAULT_ROUND_THREADS
        )
        worker = ModelRoundWorker(
            self.data,
            WorkerSettings(
                train=train,
                privacy=config.privacy,
                state_dir=options.state_dir,
                progress=options.progress,
                share_projections=options.share_projections,
                share_calibration_stats=options.share_calibration_stats,
            ),
            self._sd_step(sd_device),
        )
        encryptor = default_encryptor_factory()
        loop_ref: list[ClientLoop] = []
        loop = ClientLoop(
            transport,
            worker,
            LoopSettings(
                retry=policy,
                chunk_size=config.transport.chunk_size,
                download_buffer_idle_s=config.transport.download_buffer_idle_s,
            ),
            client_id=client_id,
            encryptor_factory=encryptor,
            backoff=backoff,
            stop_event=self.stop_event,
            on_round=lambda report: self._on_round(report, loop_ref[0]),
        )
        loop_ref.append(loop)
        self.echo(f"client {client_id} connecting to {config.server_address}")
        try:
            stats = loop.run()
        finally:
            transport.close()
        if self.stop_event.is_set() and loop.phase.value != "done":
            self.echo(f"stopped after {len(stats.rounds_completed)} round(s)")
        else:
            self.echo(f"run finished: {len(stats.rounds_completed)} round(s) trained")
        return stats
