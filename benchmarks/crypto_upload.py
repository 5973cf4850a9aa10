"""Throughput cost of encrypted uploads (X25519+HKDF -> AES-256-GCM per chunk).

Two measurements, each against a baseline measured in the same run:

1. pure crypto: encrypt+decrypt N MiB in chunks vs a plain copy of the same chunks;
2. loopback gRPC client-stream upload (generic bytes handler, optional TLS): chunks
   encrypted on the client and decrypted on the server vs the same stream unencrypted.

Target (issue 5): encrypted end-to-end upload >= 70% of the unencrypted rate.
Run: ``python benchmarks/crypto_upload.py [--mib 100] [--chunk-kib 1024] [--tls]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
from crossfed.common.crypto.upload_encryption import (
    TAG_SIZE,
    UploadDecryptor,
    UploadEncryptor,
    UploadKeyPair,
)
from rich.console import Console
from rich.progress import Progress

SERVICE = "crossfed.bench.Upload"
MIB = 1 << 20


def _chunks(total_mib: int, chunk_bytes: int) -> list[bytes]:
    """Random payload split into chunks (random: GCM cost does not depend on content)."""
    total = total_mib * MIB
    return [os.urandom(min(chunk_bytes, total - i)) for i in range(0, total, chunk_bytes)]


def _best_of(repeats: int, run: Callable[[], None]) -> float:
    """Median wall time of ``repeats`` runs after one untimed warm-up run (seconds).

    The warm-up matters: the first passes over 100 MiB of fresh 1 MiB buffers are
    dominated by page faults until the allocator stops returning memory to the OS.
    """
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pure_crypto(chunks: list[bytes], repeats: int) -> tuple[float, float, float]:
    """Seconds for (plain copy, encrypt+decrypt, encrypt+decrypt_into a payload buffer)."""
    keys = UploadKeyPair.generate()
    total = len(chunks)

    def plain() -> None:
        for chunk in chunks:
            bytearray(chunk)  # what an unencrypted path does at least once: copy the bytes

    def crypto() -> None:
        enc = UploadEncryptor(keys.public_key, "bench-client", 1)
        dec = UploadDecryptor(keys, enc.client_public_key, "bench-client", 1)
        for i, chunk in enumerate(chunks):
            dec.decrypt_chunk(i, total, enc.encrypt_chunk(i, total, chunk))
        assert dec.complete

    def crypto_into() -> None:
        enc = UploadEncryptor(keys.public_key, "bench-client", 1)
        dec = UploadDecryptor(keys, enc.client_public_key, "bench-client", 1)
        payload = memoryview(bytearray(sum(len(c) for c in chunks)))
        offset = 0
        for i, chunk in enumerate(chunks):
            end = offset + len(chunk)
            dec.decrypt_chunk_into(
                i, total, enc.encrypt_chunk(i, total, chunk), payload[offset:end]
            )
            offset = end
        assert dec.complete

    return (
        _best_of(repeats, plain),
        _best_of(repeats, crypto),
        _best_of(repeats, crypto_into),
    )


class _Sink:
    """Server side of the benchmark stream: counts (and decrypts, when asked) chunks."""

    def __init__(self, keys: UploadKeyPair) -> None:
        self.keys = keys

    def upload(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        metadata = dict(context.invocation_metadata())
        client_pub = bytes.fromhex(str(metadata.get("x-bench-client-key", "")))
        total = int(str(metadata["x-bench-total"]))
        size = int(str(metadata["x-bench-size"]))
        dec = UploadDecryptor(self.keys, client_pub, "bench-client", 1) if client_pub else None
        payload = memoryview(bytearray(size))  # a real server assembles the payload
        received = 0
        for i, message in enumerate(requests):
            if dec is None:
                payload[received : received + len(message)] = message
                received += len(message)
            else:
                end = received + len(message) - TAG_SIZE
                received += dec.decrypt_chunk_into(i, total, message, payload[received:end])
        return received.to_bytes(8, "big")


def _tls_credentials(work: Path) -> tuple[grpc.ServerCredentials, grpc.ChannelCredentials]:
    from crossfed.common.crypto.certificates import create_ca, issue_certificate
    from crossfed.common.crypto.grpc_credentials import channel_credentials, server_credentials

    create_ca(work)
    issue_certificate(work, "server", "server")
    return server_credentials(work), channel_credentials(work)


def grpc_upload(chunks: list[bytes], repeats: int, tls: bool) -> tuple[float, float]:
    """Seconds for (unencrypted, encrypted) client-stream uploads over loopback gRPC."""
    keys = UploadKeyPair.generate()
    sink = _Sink(keys)
    options = [("grpc.max_receive_message_length", 64 * MIB)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=options)
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Upload": grpc.stream_unary_rpc_method_handler(sink.upload)}
    )
    server.add_generic_rpc_handlers((handler,))
    with tempfile.TemporaryDirectory() as work:
        if tls:
            server_creds, channel_creds = _tls_credentials(Path(work))
            port = server.add_secure_port("127.0.0.1:0", server_creds)
        else:
            port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        target = f"localhost:{port}"
        channel = (
            grpc.secure_channel(target, channel_creds, options=options)
            if tls
            else grpc.insecure_channel(target, options=options)
        )
        stub = channel.stream_unary(f"/{SERVICE}/Upload")
        total = len(chunks)
        expected = sum(len(c) for c in chunks)

        def plain() -> None:
            metadata = (("x-bench-total", str(total)), ("x-bench-size", str(expected)))
            reply = stub(iter(chunks), metadata=metadata, timeout=600)
            assert int.from_bytes(reply, "big") == expected

        def encrypted() -> None:
            enc = UploadEncryptor(keys.public_key, "bench-client", 1)
            stream = (enc.encrypt_chunk(i, total, c) for i, c in enumerate(chunks))
            metadata = (
                ("x-bench-total", str(total)),
                ("x-bench-size", str(expected)),
                ("x-bench-client-key", enc.client_public_key.hex()),
            )
            reply = stub(stream, metadata=metadata, timeout=600)
            assert int.from_bytes(reply, "big") == expected

        try:
            return _best_of(repeats, plain), _best_of(repeats, encrypted)
        finally:
            channel.close()
            server.stop(None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mib", type=int, default=100, help="payload size in MiB")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="chunk size in KiB")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per measurement (median)"
    )
    parser.add_argument("--tls", action="store_true", help="run the gRPC stream over TLS")
    parser.add_argument("--no-grpc", action="store_true", help="pure crypto only")
    parser.add_argument("--no-progress", action="store_true", help="disable progress bar")
    args = parser.parse_args(argv)
    if args.mib <= 0 or args.chunk_kib <= 0 or args.repeats <= 0:
        parser.error("--mib, --chunk-kib and --repeats must be positive")

    console = Console(stderr=True)
    show = not args.no_progress and sys.stderr.isatty()
    chunks = _chunks(args.mib, args.chunk_kib * 1024)
    size_mb = sum(len(c) for c in chunks) / 1e6
    steps = 1 if args.no_grpc else 2
    with Progress(console=console, disable=not show, transient=True) as progress:
        task = progress.add_task("benchmarking", total=steps)
        plain_s, crypto_s, into_s = pure_crypto(chunks, args.repeats)
        progress.advance(task)
        if not args.no_grpc:
            grpc_plain_s, grpc_enc_s = grpc_upload(chunks, args.repeats, args.tls)
            progress.advance(task)

    print(f"payload: {size_mb:.1f} MB in {len(chunks)} chunks of {args.chunk_kib} KiB")
    print(
        f"pure:  plain copy {size_mb / plain_s:9.1f} MB/s | encrypt+decrypt "
        f"{size_mb / crypto_s:9.1f} MB/s | ratio encrypted/plain {plain_s / crypto_s:.3f}"
    )
    print(
        f"pure:  plain copy {size_mb / plain_s:9.1f} MB/s | encrypt+decrypt_into "
        f"{size_mb / into_s:9.1f} MB/s | ratio encrypted/plain {plain_s / into_s:.3f}"
    )
    if not args.no_grpc:
        transport = "TLS" if args.tls else "plaintext"
        ratio = grpc_plain_s / grpc_enc_s
        print(
            f"gRPC ({transport} loopback): unencrypted {size_mb / grpc_plain_s:9.1f} MB/s | "
            f"encrypted {size_mb / grpc_enc_s:9.1f} MB/s | ratio encrypted/unencrypted "
            f"{ratio:.3f} (target >= 0.70: {'met' if ratio >= 0.70 else 'NOT met'})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
