"""The transfer benchmark's baseline: a generic gRPC service that streams bytes in chunks with
no protocol on top, with the coordinator's channel options. Runs in the benchmark's process
or, like a deployed server, in its own (``python raw_bytes_server.py PAYLOAD PORT_FILE ...``)."""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

RAW_SERVICE = "crossfed.bench.RawBytes"


class RawBytesService:
    """Stream the same bytes in the same chunk sizes; count the bytes of an upload."""

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


def main(argv: list[str] | None = None) -> int:
    """Serve PAYLOAD's bytes until SIGTERM; the port goes to PORT_FILE once listening."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("payload", type=Path)
    parser.add_argument("port_file", type=Path)
    parser.add_argument("--chunk-size", type=int, required=True)
    parser.add_argument("--max-message-bytes", type=int, required=True)
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server, port = start_raw_server(
        RawBytesService(args.payload.read_bytes(), args.chunk_size), args.max_message_bytes
    )
    args.port_file.write_text(str(port))
    stop.wait()
    server.stop(None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
