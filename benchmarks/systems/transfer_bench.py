"""Encrypted chunked upload and chunked download of a ~100 MB model update through the real
server (in-process `CoordinatorServer`, real gRPC on 127.0.0.1, the client's own transport,
download assembler and upload encryption) vs a raw gRPC bytes stream of the same size, same
chunk size and same channel options, served by a generic service started alongside."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from crossfed.client.model_download import DownloadProgress
from crossfed.client.transport import ChannelOptions, ChannelSecurity, GrpcTransport, create_channel
from crossfed.client.update_upload import LocalUpdate, default_encryptor_factory, prepare_upload
from crossfed.common.config import ServerConfig
from crossfed.server.server_app import CoordinatorServer, ServerOptions
from crossfed.v1 import coordinator_pb2

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
from systems.sized_model import model_for_bytes

TRANSFER_TARGET = Target("ratio", ">=", 0.5)
ENCRYPTION_COST_TARGET = Target("ratio", ">=", 0.7)  # issue 5: encrypted >= 70% of plaintext
RAW_SERVICE = "crossfed.bench.RawBytes"
MiB = 1024 * 1024


@dataclass(frozen=True)
class TransferSettings:
    """Update size, chunking and repetitions (each repetition alternates raw and real)."""

    model_bytes: int = 100_000_000
    chunk_size: int = 1 * MiB
    max_message_bytes: int = 4 * MiB
    repeats: int = 3


class RawBytesService:
    """The baseline: stream the same bytes in the same chunk sizes, no protocol on top."""

    def __init__(self, payload: bytes, chunk_size: int) -> None:
        self.payload = payload
        self.chunk_size = chunk_size

    def download(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        view = memoryview(self.payload)
        for start in range(0, len(view), self.chunk_size):
            yield bytes(view[start : start + self.chunk_size])

    def upload(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        received = 0
        for message in requests:
            received += len(message)
        return received.to_bytes(8, "big")


def start_raw_server(service: RawBytesService, max_message_bytes: int) -> tuple[grpc.Server, int]:
    """A generic-handler gRPC server with the coordinator's message-size/keepalive options."""
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.so_reuseport", 0),
        ("grpc.http2.bdp_probe", 0),  # as crossfed.server.grpc_server sets them
        ("grpc.http2.lookahead_bytes", 1024 * 1024),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=options)
    handler = grpc.method_handlers_generic_handler(
        RAW_SERVICE,
        {
            "Download": grpc.unary_stream_rpc_method_handler(service.download),
            "Upload": grpc.stream_unary_rpc_method_handler(service.upload),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _server_config(state_dir: Path, settings: TransferSettings, clients: int) -> ServerConfig:
    sized = model_for_bytes(settings.model_bytes)
    return ServerConfig.model_validate(
        {
            "listen": f"127.0.0.1:{free_port()}",
            "state_dir": str(state_dir),
            "model": sized.config.model_dump(),
            # every client is selected and the round stays open while we measure: each
            # timed upload is one more client folding into the same round
            "rounds": {"rounds": 1, "min_clients": clients, "round_deadline_s": 3600.0},
            "tls": {"insecure": True},
            "transport": {
                "chunk_size": settings.chunk_size,
                "max_message_bytes": settings.max_message_bytes,
            },
        }
    )


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
    with tempfile.TemporaryDirectory(prefix="crossfed-bench-transfer-") as work:
        config = _server_config(Path(work) / "state", settings, clients)
        options = ServerOptions(
            client_timeout_s=3600.0,
            start_timeout_s=3600.0,
            allow_unencrypted_uploads=True,  # for the encryption-cost comparison (issue 5)
        )
        server = CoordinatorServer.create(config, options)
        port = server.start()
        target = f"127.0.0.1:{port}"
        transports = [
            GrpcTransport.connect(
                target,
                ChannelSecurity(insecure=True),
                client_id=f"bench-{i}",
                options=channel_options,
            )
            for i in range(clients)
        ]
        raw_server: grpc.Server | None = None
        raw_channel: grpc.Channel | None = None
        try:
            for transport in transports:
                transport.register(
                    coordinator_pb2.RegisterRequest(modality=1, num_samples=10)  # type: ignore[arg-type]
                )
            beat = transports[0].heartbeat(coordinator_pb2.HeartbeatRequest())
            if beat.action != coordinator_pb2.ACTION_TRAIN:
                raise BenchmarkError(f"server did not open a round: {beat.message}")
            round_id, key = int(beat.round), bytes(beat.upload_public_key)

            def real_download(transport: GrpcTransport) -> memoryview:
                progress = DownloadProgress(round_id)
                for chunk in transport.download(coordinator_pb2.DownloadRequest(round=round_id)):
                    progress.add(chunk)
                return progress.payload()

            # warm-up, and the update we send back (as bytes, like a trained update)
            payload = bytes(real_download(transports[-1]))
            raw_server, raw_port = start_raw_server(
                RawBytesService(payload, settings.chunk_size), settings.max_message_bytes
            )
            raw_channel = create_channel(
                f"127.0.0.1:{raw_port}", ChannelSecurity(insecure=True), channel_options
            )
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
        finally:
            for transport in transports:
                transport.close()
            if raw_channel is not None:
                raw_channel.close()
            if raw_server is not None:
                raw_server.stop(None)
            server.stop()


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
        "transport": "plaintext gRPC on 127.0.0.1 (in-process server and client)",
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
                "buffer, sha256 for the upload record, decode, validate, FedAvg fold",
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
