"""Prometheus metrics of the coordination server, in their own registry.

Three sources, no calls sprinkled through the logic: (1) an event follower thread reads the
round engine's event log (rounds committed/failed, uploads, durations), (2) a gRPC server
interceptor counts bytes in/out per method and upload rejections by status, (3) a collector
reads engine state at scrape time (current round, clients by state, epsilon spent).
Served on ``--metrics-port`` by prometheus-client's HTTP server when set.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from crossfed.server.errors import ConfigurationError
from crossfed.server.round_engine import RoundEngine
from crossfed.server.state.records import (
    CLIENT_OFFLINE,
    CLIENT_REGISTERED,
    CLIENT_REMOVED,
    CLIENT_SELECTED,
    CLIENT_UPLOADED,
    RUN_COMPLETED,
    RUN_FAILED,
    RUN_IDLE,
    RUN_PAUSED,
    RUN_RUNNING,
    RUN_STOPPED,
    EventRecord,
)
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

UPLOAD_METHOD = "/crossfed.v1.Coordinator/UploadUpdate"
CLIENT_STATES = (
    CLIENT_REGISTERED,
    CLIENT_SELECTED,
    CLIENT_UPLOADED,
    CLIENT_OFFLINE,
    CLIENT_REMOVED,
)
RUN_STATES = (RUN_IDLE, RUN_RUNNING, RUN_PAUSED, RUN_STOPPED, RUN_COMPLETED, RUN_FAILED)
_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_FOLLOW_WAIT_S = 0.5


class MetricsError(ConfigurationError):
    """The metrics endpoint cannot be served (e.g. the port is taken)."""


def _short_method(full: str) -> str:
    """'/crossfed.v1.Coordinator/UploadUpdate' -> 'Coordinator/UploadUpdate'."""
    service, _, method = full.lstrip("/").partition("/")
    return f"{service.rsplit('.', 1)[-1]}/{method}"


class _EngineStateCollector(Collector):
    """Gauges read from the engine at scrape time (always current, never stale)."""

    def __init__(self, engine: RoundEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterable[GaugeMetricFamily]:
        engine = self.engine
        with engine.events_changed:  # one consistent snapshot
            run = engine.run
            opened = engine.open_round
            clients = engine.clients()
            budget = engine.epsilon_budget
        current = GaugeMetricFamily(
            "crossfed_current_round",
            "The open round, else the last committed one.",
        )
        current.add_metric([], float(opened.round if opened else run.last_committed_round))
        yield current
        committed = GaugeMetricFamily(
            "crossfed_last_committed_round", "Last round whose global model was committed."
        )
        committed.add_metric([], float(run.last_committed_round))
        yield committed
        total = GaugeMetricFamily("crossfed_total_rounds", "Rounds the run is configured for.")
        total.add_metric([], float(run.total_rounds))
        yield total
        state = GaugeMetricFamily(
            "crossfed_run_state", "1 for the run's current state.", labels=["state"]
        )
        for name in RUN_STATES:
            state.add_metric([name], 1.0 if run.state == name else 0.0)
        yield state
        counts = dict.fromkeys(CLIENT_STATES, 0)
        for client in clients:
            counts[client.state] = counts.get(client.state, 0) + 1
        by_state = GaugeMetricFamily("crossfed_clients", "Clients by state.", labels=["state"])
        for name, count in counts.items():
            by_state.add_metric([name], float(count))
        yield by_state
        eps = GaugeMetricFamily(
            "crossfed_epsilon_spent",
            "Projection-DP epsilon spent: the largest of any client, counted by the server.",
        )
        eps.add_metric([], run.epsilon_spent)
        yield eps
        eps_budget = GaugeMetricFamily(
            "crossfed_epsilon_budget", "Projection-DP epsilon budget (0 = none)."
        )
        eps_budget.add_metric([], budget)
        yield eps_budget


class ServerMetrics:
    """The server's Prometheus registry plus what feeds it; `start`/`stop` with the server."""

    def __init__(self, engine: RoundEngine, registry: CollectorRegistry | None = None) -> None:
        self.engine = engine
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rounds_committed = Counter(
            "crossfed_rounds_committed", "Rounds committed.", registry=r
        )
        self.rounds_failed = Counter(
            "crossfed_rounds_failed", "Round attempts that failed.", registry=r
        )
        self.uploads_accepted = Counter(
            "crossfed_uploads_accepted", "Updates counted into a round.", registry=r
        )
        self.uploads_rejected = Counter(
            "crossfed_uploads_rejected",
            "Uploads refused, by gRPC status (invalid_argument, data_loss, ...).",
            ["reason"],
            registry=r,
        )
        self.updates_clipped = Counter(
            "crossfed_updates_clipped",
            "Updates folded in scaled down to the update bound (update_bound.max_norm_ratio).",
            registry=r,
        )
        self.uploads_stalled = Counter(
            "crossfed_uploads_stalled",
            "Upload streams cancelled for sending nothing (transport.upload_idle_timeout_s).",
            registry=r,
        )
        self.projections_refused = Counter(
            "crossfed_projections_refused",
            "Projection releases refused (no mandated noise, over the epsilon budget, invalid).",
            registry=r,
        )
        self.bytes_received = Counter(
            "crossfed_grpc_received_bytes", "Request bytes received.", ["method"], registry=r
        )
        self.bytes_sent = Counter(
            "crossfed_grpc_sent_bytes", "Response bytes sent.", ["method"], registry=r
        )
        self.rpcs = Counter(
            "crossfed_grpc_handled",
            "RPCs handled, by method and status.",
            ["method", "code"],
            registry=r,
        )
        self.events = Counter("crossfed_events", "Engine events by kind.", ["kind"], registry=r)
        self.round_duration = Histogram(
            "crossfed_round_duration_seconds",
            "Round attempt duration, open to commit/fail.",
            ["outcome"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.aggregation_duration = Histogram(
            "crossfed_aggregation_seconds",
            "Commit-time aggregation: finish the running FedAvg sum (eq. 15) and checkpoint.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.fold_duration = Histogram(
            "crossfed_upload_fold_seconds",
            "Folding one accepted update into the running FedAvg sum (eq. 15).",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        r.register(_EngineStateCollector(engine))
        self.interceptor = MetricsInterceptor(self)
        self._round_started: dict[int, float] = {}
        self._after = self._last_event_id()
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None
        self._httpd: Any = None
        self.port: int | None = None

    def _last_event_id(self) -> int:
        """Events before this point belong to an earlier process (or the engine's startup)."""
        after = 0
        while True:
            page = self.engine.store.events_after(after, 1000)
            if not page:
                return after
            after = page[-1].event_id

    # -- event follower ------------------------------------------------------------------
    def observe_event(self, event: EventRecord) -> None:
        """Update counters/histograms from one engine event."""
        self.events.labels(event.kind).inc()
        values = event.values
        if event.kind == "round_started":
            self._round_started[event.round] = event.time_unix_s
        elif event.kind == "round_committed":
            self.rounds_committed.inc()
            self._observe_round_end(event, "committed")
            if "aggregate_s" in values:
                self.aggregation_duration.observe(values["aggregate_s"])
        elif event.kind in ("round_failed", "round_interrupted"):
            self.rounds_failed.inc()
            self._observe_round_end(event, "failed")
        elif event.kind == "upload_accepted":
            self.uploads_accepted.inc()
            if "fold_s" in values:
                self.fold_duration.observe(values["fold_s"])
        elif event.kind == "update_clipped":
            self.updates_clipped.inc()
        elif event.kind == "upload_stalled":
            self.uploads_stalled.inc()
        elif event.kind == "projections_refused":
            self.projections_refused.inc()

    def _observe_round_end(self, event: EventRecord, outcome: str) -> None:
        started = self._round_started.pop(event.round, None)
        if started is not None:
            self.round_duration.labels(outcome).observe(max(0.0, event.time_unix_s - started))

    def poll_events(self) -> int:
        """Consume engine events not seen yet; returns how many (the follower's loop body)."""
        events = self.engine.store.events_after(self._after, 1000)
        for event in events:
            self.observe_event(event)
            self._after = event.event_id
        return len(events)

    def _follow(self) -> None:
        changed = self.engine.events_changed
        while not self._stop.is_set():
            try:
                with changed:
                    if not self.poll_events():
                        changed.wait(_FOLLOW_WAIT_S)
            except Exception:  # a broken scrape source must not kill the server
                log.exception("metrics event follower failed; retrying")
                self._stop.wait(1.0)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, port: int | None = None, host: str = "127.0.0.1") -> int | None:
        """Follow engine events; serve /metrics on ``host:port`` when ``port`` is not None
        (0 picks a free port). Returns the bound port."""
        if self._follower is None:
            self._follower = threading.Thread(
                target=self._follow, name="crossfed-metrics", daemon=True
            )
            self._follower.start()
        if port is not None and self._httpd is None:
            try:
                self._httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
            except OSError as exc:
                raise MetricsError(f"cannot serve metrics on {host}:{port}: {exc}") from None
            self.port = int(self._httpd.server_port)
            log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop(self) -> None:
        """Stop the follower and the HTTP endpoint."""
        self._stop.set()
        with self.engine.events_changed:
            self.engine.events_changed.notify_all()
        if self._follower is not None:
            self._follower.join(timeout=5)
            self._follower = None
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


# --------------------------------------------------------------------------- interceptor


def _code_name(context: grpc.ServicerContext, failed: bool) -> str:
    code = context.code()  # type: ignore[attr-defined]
    if isinstance(code, grpc.StatusCode):
        return str(code.name).lower()
    return "unknown" if failed else "ok"


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts request/response bytes and final status per method; upload rejections by status."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return self._wrap(handler, handler_call_details.method)

    def _finish(self, method: str, full: str, context: grpc.ServicerContext, failed: bool) -> None:
        code = _code_name(context, failed)
        self.metrics.rpcs.labels(method, code).inc()
        if full == UPLOAD_METHOD and code != "ok":
            self.metrics.uploads_rejected.labels(code).inc()

    def _wrap(self, handler: grpc.RpcMethodHandler, full: str) -> grpc.RpcMethodHandler:
        method = _short_method(full)
        received = self.metrics.bytes_received.labels(method)
        sent = self.metrics.bytes_sent.labels(method)
        deserialize = handler.request_deserializer
        serialize = handler.response_serializer

        # bytes are counted where gRPC (de)serializes each message: exact wire payload sizes
        # at no extra cost (msg.ByteSize() on a 1 MiB chunk costs about a serialization)
        def counting_deserializer(raw: bytes) -> Any:
            received.inc(len(raw))
            return deserialize(raw) if deserialize is not None else raw

        def counting_serializer(message: Any) -> bytes:
            raw = serialize(message) if serialize is not None else message
            sent.inc(len(raw))
            return raw  # type: ignore[no-any-return]

        def run(behavior: Callable[..., Any], request: Any, context: grpc.ServicerContext) -> Any:
            failed = True
            try:
                response = behavior(request, context)
                failed = False
                return response
            finally:
                self._finish(method, full, context, failed)

        def run_stream(
            behavior: Callable[..., Iterator[Any]], request: Any, context: grpc.ServicerContext
        ) -> Iterator[Any]:
            try:
                yield from behavior(request, context)
            except GeneratorExit:
                self.metrics.rpcs.labels(method, "cancelled").inc()
                raise
            except BaseException:
                self._finish(method, full, context, True)
                raise
            else:
                self._finish(method, full, context, False)

        kw: dict[str, Any] = {
            "request_deserializer": counting_deserializer,
            "response_serializer": counting_serializer,
        }
        if handler.unary_unary is not None:
            uu = handler.unary_unary
            return grpc.unary_unary_rpc_method_handler(
                lambda request, context: run(uu, request, context), **kw
            )
        if handler.unary_stream is not None:
            us = handler.unary_stream
            return grpc.unary_stream_rpc_method_handler(
                lambda request, context: run_stream(us, request, context), **kw
            )
        if handler.stream_unary is not None:
            su = handler.stream_unary
            return grpc.stream_unary_rpc_method_handler(
                lambda requests, context: run(su, requests, context), **kw
            )
        if handler.stream_stream is not None:
            ss = handler.stream_stream
            return grpc.stream_stream_rpc_method_handler(
                lambda requests, context: run_stream(ss, requests, context), **kw
            )
        return handler
