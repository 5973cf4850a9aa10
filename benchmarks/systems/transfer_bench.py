"""Encrypted chunked upload and chunked download of a ~100 MB model update through the real
server (`crossfed server start` in its own process, as deployed, or an in-process
`CoordinatorServer`; real gRPC on 127.0.0.1, the client's own transport, download assembler
and upload encryption) vs a raw gRPC bytes stream of the same size, same chunk size and same
channel options, served by a generic service placed the same way (own process or in-process).

In-process, the server's Python work (decryption, reassembly, validation, FedAvg) shares one
GIL with the benchmark's client while the raw baseline has almost none: that topology never
occurs in deployment, so it is reported beside the separate-process figures, not instead."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossfed.client.loop import LoopSettings
from crossfed.client.model_download import DownloadProgress, download_buffer_pool
from crossfed.client.transport import ChannelOptions, ChannelSecurity, GrpcTransport, create_channel
from crossfed.client.update_upload import LocalUpdate, default_encryptor_factory, prepare_upload
from crossfed.common.config import ServerConfig
from crossfed.server.server_app import CoordinatorServer, ServerOptions
from crossfed.v1 import coordinator_pb2

from systems import raw_bytes_server
from systems.loopback_ports import free_port
from systems.measurement_records import (
    BenchmarkError,
    LoadSample,
    Measurement,
    Target,
    load_average,
    median,
    safe_ratio,
)
from systems.raw_bytes_server import RAW_SERVICE, RawBytesService, start_raw_server
from systems.server_process import launch_with_port_file, start_server_process
from systems.sized_model import model_for_bytes

TRANSFER_TARGET = Target("ratio", ">=", 0.5)
ENCRYPTION_COST_TARGET = Target("ratio", ">=", 0.7)  # issue 5: encrypted >= 70% of plaintext
MiB = 1024 * 1024


@dataclass(frozen=True)
class TransferSettings:
    """Update size, chunking and repetitions (each repetition alternates raw and real)."""

    model_bytes: int = 100_000_000
    chunk_size: int = 1 * MiB
    max_message_bytes: int = 4 * MiB
    repeats: int = 3
    # Server and raw baseline each in their own process, as deployed; False: both in the
    # benchmark's process (sharing its GIL with the client).
    separate_processes: bool = True


def _config(settings: TransferSettings, clients: int) -> dict[str, Any]:
    """ServerConfig fields (listen and state_dir are added where the server starts)."""
    return {
        "model": model_for_bytes(settings.model_bytes).config.model_dump(),
        # every client is selected and the round stays open while we measure: each timed
        # upload is one more client folding into the same round
        "rounds": {
            "rounds": 1,
            "min_clients": clients,
            "round_deadline_s": 3600.0,
            "start_timeout_s": 3600.0,
            "client_timeout_s": 3600.0,
        },
        "tls": {"insecure": True},
        "allow_unencrypted_uploads": True,  # the encryption-cost comparison (issue 5)
        "transport": {
            "chunk_size": settings.chunk_size,
            "max_message_bytes": settings.max_message_bytes,
        },
    }


@contextmanager
def _coordinator(settings: TransferSettings, clients: int, work: Path) -> Iterator[str]:
    """The real server, plaintext uploads allowed (for the encryption-cost comparison,
    issue 5); yields its host:port."""
    if settings.separate_processes:
        process = start_server_process(work / "coordinator", _config(settings, clients), [])
        try:
            yield process.target
        finally:
            process.stop()
        return
    config = ServerConfig.model_validate(
        {
            **_config(settings, clients),
            "listen": f"127.0.0.1:{free_port()}",
            "state_dir": str(work / "state"),
        }
    )
    server = CoordinatorServer.create(config, ServerOptions())
    port = server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()


@contextmanager
def _raw_baseline(settings: TransferSettings, payload: bytes, work: Path) -> Iterator[str]:
    """The raw bytes service over ``payload``, placed like the coordinator; yields host:port."""
    if not settings.separate_processes:
        server, port = start_raw_server(
            RawBytesService(payload, settings.chunk_size), settings.max_message_bytes
        )
        try:
            yield f"127.0.0.1:{port}"
        finally:
            server.stop(None)
        return
    payload_file = work / "raw-payload.bin"
    payload_file.write_bytes(payload)
    command = [
        sys.executable,
        raw_bytes_server.__file__,
        str(payload_file),
        str(work / "raw-port"),
        f"--chunk-size={settings.chunk_size}",
        f"--max-message-bytes={settings.max_message_bytes}",
    ]
    process = launch_with_port_file(command, work / "raw-port", work / "raw.log", work, 60.0)
    try:
        yield process.target
    finally:
        process.stop()


@dataclass
class _Timings:
    raw_download_s: list[float]
    real_download_s: list[float]
    raw_upload_s: list[float]
    real_upload_s: list[float]
    encrypt_s: list[float]
    plain_upload_s: list[float]
    payload_bytes: int
    wire_bytes: int


def _run(settings: TransferSettings, advance: Callable[[], None]) -> _Timings:
    # per repeat one encrypted and one plaintext upload, + 1 warm-up upload, + 1 client that
    # never uploads (so the round stays open)
    clients = 2 * settings.repeats + 2
    channel_options = ChannelOptions(max_message_bytes=settings.max_message_bytes)
    with (
        tempfile.TemporaryDirectory(prefix="crossfed-bench-transfer-") as tmp,
        ExitStack() as stack,
    ):
        work = Path(tmp)
        target = stack.enter_context(_coordinator(settings, clients, work))
        transports = [
            GrpcTransport.connect(
                target,
                ChannelSecurity(insecure=True),
                client_id=f"bench-{i}",
                options=channel_options,
            )
            for i in range(clients)
        ]
        for transport in transports:
            stack.callback(transport.close)
        for transport in transports:
            transport.register(
                coordinator_pb2.RegisterRequest(modality=1, num_samples=10)  # type: ignore[arg-type]
            )
        beat = transports[0].heartbeat(coordinator_pb2.HeartbeatRequest())
        if beat.action != coordinator_pb2.ACTION_TRAIN:
            raise BenchmarkError(f"server did not open a round: {beat.message}")
        round_id, key = int(beat.round), bytes(beat.upload_public_key)

        # the daemon keeps its reassembly buffer across rounds (client/model_download.py)
        buffers = download_buffer_pool(LoopSettings().download_buffer_idle_s)

        def real_download(transport: GrpcTransport) -> memoryview:
            progress = DownloadProgress(round_id, buffer_pool=buffers)
            for chunk in transport.download(coordinator_pb2.DownloadRequest(round=round_id)):
                progress.add(chunk)
            return progress.payload()

        # warm-up, and the update we send back (as bytes, like a trained update)
        payload = bytes(real_download(transports[-1]))
        raw_target = stack.enter_context(_raw_baseline(settings, payload, work))
        raw_channel = create_channel(raw_target, ChannelSecurity(insecure=True), channel_options)
        stack.callback(raw_channel.close)
        raw_download_call = raw_channel.unary_stream(f"/{RAW_SERVICE}/Download")
        raw_upload_call = raw_channel.stream_unary(f"/{RAW_SERVICE}/Upload")

        def raw_download() -> int:
            return sum(len(m) for m in raw_download_call(b"", timeout=600))

        chunks = [
            payload[i : i + settings.chunk_size]
            for i in range(0, len(payload), settings.chunk_size)
        ]

        def raw_upload() -> int:
            reply = raw_upload_call(iter(chunks), timeout=600)
            return int.from_bytes(reply, "big")

        factory = default_encryptor_factory()
        if factory is None:
            raise BenchmarkError("upload encryption module is not installed")
        wire_bytes = 0

        def real_upload(index: int, encrypted: bool = True) -> float:
            nonlocal wire_bytes
            started = time.perf_counter()
            prepared = prepare_upload(
                LocalUpdate(payload=payload, num_samples=10),
                round_id,
                f"bench-{index}",
                f"upload-{index}",
                settings.chunk_size,
                key if encrypted else b"",
                factory if encrypted else None,
            )
            encrypted_at = time.perf_counter()
            reply = transports[index].upload(prepared.messages)
            if not reply.accepted or reply.duplicate:
                raise BenchmarkError(f"upload {index} not counted: {reply.message}")
            if encrypted:
                wire_bytes = prepared.wire_bytes
            return encrypted_at - started

        if raw_download() != len(payload) or raw_upload() != len(payload):  # warm-up
            raise BenchmarkError("raw baseline stream lost bytes")
        real_upload(0)
        timings = _Timings([], [], [], [], [], [], len(payload), 0)
        for rep in range(settings.repeats):
            timings.raw_download_s.append(_timed(raw_download))
            started = time.perf_counter()
            real_download(transports[rep])
            timings.real_download_s.append(time.perf_counter() - started)
            timings.raw_upload_s.append(_timed(raw_upload))
            started = time.perf_counter()
            timings.encrypt_s.append(real_upload(rep + 1))
            timings.real_upload_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            real_upload(settings.repeats + 1 + rep, encrypted=False)
            timings.plain_upload_s.append(time.perf_counter() - started)
            advance()
        timings.wire_bytes = wire_bytes
        return timings


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure_transfer(
    settings: TransferSettings, advance: Callable[[], None] = lambda: None
) -> list[Measurement]:
    """Upload and download figures (MB/s, median of ``repeats``) with their raw baselines."""
    before = load_average()
    t = _run(settings, advance)
    load = LoadSample(before, load_average())
    mb = t.payload_bytes / 1e6
    common = {
        "payload_mb": mb,
        "chunk_size": settings.chunk_size,
        "max_message_bytes": settings.max_message_bytes,
        "repeats": settings.repeats,
        "transport": (
            "plaintext gRPC on 127.0.0.1; server and raw baseline each in their own process"
            if settings.separate_processes
            else "plaintext gRPC on 127.0.0.1; server, raw baseline and client in one process"
        ),
    }
    raw_label = "raw gRPC bytes stream, same size/chunks/channel options"
    raw_ratio = "real path MB/s / raw bytes stream MB/s"
    results = []
    for key, title, real, base, label, ratio_definition, target, extra in (
        (
            "upload_encrypted",
            "Encrypted chunked upload through CoordinatorServer",
            t.real_upload_s,
            t.raw_upload_s,
            raw_label,
            raw_ratio,
            TRANSFER_TARGET,
            {
                "includes": "client: prepare_upload, then AES-GCM per chunk into pre-framed "
                "messages made as gRPC sends them (no whole-payload sha256: every chunk is "
                "AEAD-authenticated); server: decrypt in place into the (pooled) reassembly "
                "buffer, SHA-256 of the chunks' AES-GCM tags for the upload record "
                "(transport.hash_encrypted_uploads=false, the default), decode, validate, "
                "FedAvg fold",
                "client_prepare_s": t.encrypt_s,
                "wire_bytes": t.wire_bytes,
            },
        ),
        (
            "download_chunked",
            "Chunked model download from CoordinatorServer",
            t.real_download_s,
            t.raw_download_s,
            raw_label,
            raw_ratio,
            TRANSFER_TARGET,
            {
                "includes": "server: pre-framed chunks read from the checkpoint (sha256 "
                "cached per version); client: zero-copy frame parse, ChunkAssembler copy + "
                "sha256 verify, payload as a read-only view"
            },
        ),
        (
            "upload_encryption_cost",
            "Encrypted vs unencrypted upload through CoordinatorServer",
            t.real_upload_s,
            t.plain_upload_s,
            (
                "the same server's plaintext UploadUpdate (allow_unencrypted_uploads), "
                "same payload, chunks and channel"
            ),
            "encrypted MB/s / unencrypted MB/s",
            ENCRYPTION_COST_TARGET,
            {
                "includes": "baseline: client sha256 of the payload, chunks with the digest; "
                "server: reassembly + sha256 verify, decode, validate, FedAvg fold",
            },
        ),
    ):
        rates = [mb / s for s in real]
        base_rates = [mb / s for s in base]
        value, baseline = median(rates), median(base_rates)
        if not settings.separate_processes:
            key, title = f"{key}_in_process", f"{title} (in-process server)"
        results.append(
            Measurement(
                key=key,
                title=title,
                value=value,
                unit="MB/s",
                baseline=baseline,
                baseline_unit="MB/s",
                baseline_label=label,
                ratio=safe_ratio(value, baseline),
                ratio_definition=ratio_definition,
                target=target,
                load=load,
                samples=rates,
                baseline_samples=base_rates,
                details={**common, **extra, "seconds": real, "baseline_seconds": base},
            )
        )
    return results
