"""Build the gRPC server: Coordinator (and Admin when given), health checking
(grpc.health.v1), reflection, explicit message-size limits, TLS or explicit insecure mode,
and interceptors (authentication)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc
from crossfed.server.coordinator_servicer import CoordinatorServicer, add_coordinator_to_server
from crossfed.server.errors import ConfigurationError
from crossfed.server.malloc_tuning import tune_server_malloc
from crossfed.v1 import coordinator_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

COORDINATOR_SERVICE = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name


@dataclass
class RunningServer:
    """A started gRPC server and the port it bound."""

    server: grpc.Server
    port: int
    health: health.HealthServicer

    def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING, refuse new RPCs, give in-flight ones ``grace_s`` to finish."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()


def start_grpc_server(
    coordinator: CoordinatorServicer,
    listen: str,
    *,
    max_message_bytes: int,
    server_credentials: grpc.ServerCredentials | None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    extra_services: Sequence[tuple[object, str]] = (),
    max_workers: int = 32,
    frame_bytes: int | None = None,
) -> RunningServer:
    """Start serving on ``listen`` (host:port; port 0 picks a free one). ``frame_bytes`` is
    the largest chunk message the server expects (default ``max_message_bytes``)."""
    # frames from a reused heap, everything larger mmapped and freed to the OS (see module)
    tune_server_malloc(max_message_bytes if frame_bytes is None else frame_bytes)
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
        # no BDP probing: it grows every stream's receive window without bound, and each
        # client-streamed upload waiting for admission was buffered whole in the transport
        # (measured: 30 waiting 100 MB uploads = +3.4 GB). A fixed 1 MiB stream window
        # instead: <= 1 MiB buffered per waiting upload, and up to 1 MiB per round trip on
        # a WAN link (~20 MB/s per upload at 50 ms RTT; gRPC's 64 KiB default: ~1.3 MB/s)
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", 1024 * 1024),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="crossfed-rpc"),
        options=options,
        interceptors=list(interceptors),
        maximum_concurrent_rpcs=max_workers * 4,
    )
    add_coordinator_to_server(coordinator, server)  # zero-copy framing of the bulk streams
    names = [COORDINATOR_SERVICE]
    for adder, name in extra_services:
        adder(server)  # type: ignore[operator]
        names.append(name)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    served = list(names)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    if server_credentials is None:
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, server_credentials)
    if port == 0:
        raise ConfigurationError(f"cannot listen on {listen} (address in use or invalid)")
    server.start()
    for name in ("", *served):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, port, health_servicer)
