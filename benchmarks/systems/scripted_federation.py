"""Lightweight scripted clients (generated stubs only, no daemon, no training) that follow the
server's protocol like the real loop does: register, heartbeat, obey poll_after_ms on WAIT,
on TRAIN download the global model and upload an encrypted update, stop on DONE. Many of them
run as threads of one process, so coordination cost and server memory can be measured."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from crossfed.common.crypto.upload_encryption import UploadEncryptor
from crossfed.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

from systems.measurement_records import BenchmarkError

T = TypeVar("T")

_RETRY_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.DATA_LOSS,
    }
)


@dataclass(frozen=True)
class RoundTiming:
    """One client's work in one round (perf_counter seconds)."""

    round: int
    heartbeat_s: float  # the Heartbeat call that said TRAIN
    download_s: float
    upload_s: float
    train_seen_at: float  # when the TRAIN answer arrived
    uploaded_at: float  # when the upload was acknowledged


@dataclass
class UpdateSource:
    """The update every client sends back (same keys/shapes as the global model)."""

    payload: bytes
    chunk_size: int
    sha256: bytes = b""

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.payload).digest()

    @property
    def total_chunks(self) -> int:
        return max(1, -(-len(self.payload) // self.chunk_size))


@dataclass
class ScriptedFedClient:
    """One protocol-following client on an insecure channel (x-crossfed-client-id header)."""

    target: str
    client_id: str
    update: UpdateSource
    num_samples: int = 10
    max_message_bytes: int = 4 * 1024 * 1024
    timings: list[RoundTiming] = field(default_factory=list)
    heartbeats: int = 0
    retries: int = 0
    error: str = ""
    _channel: grpc.Channel = field(init=False)
    _stub: coordinator_pb2_grpc.CoordinatorStub = field(init=False)

    def __post_init__(self) -> None:
        self._channel = grpc.insecure_channel(
            self.target,
            options=[
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)

    @property
    def _md(self) -> tuple[tuple[str, str], ...]:
        return (("x-crossfed-client-id", self.client_id),)

    def close(self) -> None:
        self._channel.close()

    def _register(self) -> None:
        self._stub.Register(
            coordinator_pb2.RegisterRequest(modality=1, num_samples=self.num_samples),  # type: ignore[arg-type]
            metadata=self._md,
            timeout=60,
        )

    def _download(self, round_no: int) -> int:
        received = 0
        expected = -1
        for chunk in self._stub.DownloadGlobalModel(
            coordinator_pb2.DownloadRequest(round=round_no), metadata=self._md, timeout=1800
        ):
            received += len(chunk.data)
            expected = int(chunk.payload_size)
        if received != expected:
            raise BenchmarkError(f"{self.client_id}: download got {received} of {expected} bytes")
        return received

    def _messages(self, round_no: int, key: bytes) -> Iterator[coordinator_pb2.UploadMessage]:
        """Header, then chunks encrypted lazily (no whole-update ciphertext held in memory)."""
        upd = self.update
        encryptor = UploadEncryptor(key, self.client_id, round_no)
        total = upd.total_chunks
        yield coordinator_pb2.UploadMessage(
            header=coordinator_pb2.UploadHeader(
                round=round_no,
                client_public_key=encryptor.client_public_key,
                num_samples=self.num_samples,
                payload_size=len(upd.payload),
                payload_sha256=upd.sha256,
                total_chunks=total,
                encrypted=True,
                upload_id=uuid.uuid4().hex,
            )
        )
        view = memoryview(upd.payload)
        for index in range(total):
            plain = bytes(view[index * upd.chunk_size : (index + 1) * upd.chunk_size])
            yield coordinator_pb2.UploadMessage(
                chunk=common_pb2.TensorChunk(
                    index=index,
                    total=total,
                    data=encryptor.encrypt_chunk(index, total, plain),
                    payload_sha256=upd.sha256,
                    payload_size=len(upd.payload),
                    round=round_no,
                )
            )

    def run(self, stop: threading.Event, deadline_s: float) -> None:
        """Follow the protocol until DONE, ``stop`` or ``deadline_s`` (records any error)."""
        try:
            self._call_with_retry(self._register, stop, deadline_s)
            while not stop.is_set() and time.perf_counter() < deadline_s:
                started = time.perf_counter()
                beat = self._call_with_retry(
                    lambda: self._stub.Heartbeat(
                        coordinator_pb2.HeartbeatRequest(), metadata=self._md, timeout=60
                    ),
                    stop,
                    deadline_s,
                )
                self.heartbeats += 1
                seen = time.perf_counter()
                if beat is None or beat.action == coordinator_pb2.ACTION_DONE:
                    return
                if beat.action == coordinator_pb2.ACTION_REGISTER:
                    self._call_with_retry(self._register, stop, deadline_s)
                    continue
                if beat.action != coordinator_pb2.ACTION_TRAIN:
                    stop.wait(max(beat.poll_after_ms, 1) / 1000.0)
                    continue
                self._train_round(beat, started, seen, stop, deadline_s)
        except Exception as exc:  # noqa: BLE001 -- a client thread must report, not vanish
            self.error = f"{type(exc).__name__}: {exc}"

    def _train_round(
        self,
        beat: coordinator_pb2.HeartbeatResponse,
        started: float,
        seen: float,
        stop: threading.Event,
        deadline_s: float,
    ) -> None:
        round_no, key = int(beat.round), bytes(beat.upload_public_key)
        try:
            t0 = time.perf_counter()
            self._call_with_retry(lambda: self._download(round_no), stop, deadline_s)
            t1 = time.perf_counter()
            self._call_with_retry(
                lambda: self._stub.UploadUpdate(
                    self._messages(round_no, key), metadata=self._md, timeout=1800
                ),
                stop,
                deadline_s,
            )
            t2 = time.perf_counter()
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE):
                return  # the round closed under us; the next heartbeat says what is next
            raise
        self.timings.append(RoundTiming(round_no, seen - started, t1 - t0, t2 - t1, seen, t2))

    def _call_with_retry(
        self, call: Callable[[], T], stop: threading.Event, deadline_s: float
    ) -> T | None:
        delay = 0.1
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                if exc.code() not in _RETRY_CODES or time.perf_counter() > deadline_s:
                    raise
                self.retries += 1
                if stop.wait(delay):
                    return None
                delay = min(delay * 2, 2.0)


@dataclass
class FederationResult:
    """What the scripted federation did, per client."""

    clients: list[ScriptedFedClient]
    wall_s: float

    @property
    def errors(self) -> list[str]:
        return [f"{c.client_id}: {c.error}" for c in self.clients if c.error]

    def commit_times(self) -> dict[int, float]:
        """Round -> when its last upload was acknowledged (the server then commits it on its
        committer thread; participants hear the next round when that commit ends)."""
        out: dict[int, float] = {}
        for client in self.clients:
            for t in client.timings:
                out[t.round] = max(out.get(t.round, 0.0), t.uploaded_at)
        return out

    def all_timings(self) -> list[RoundTiming]:
        return [t for c in self.clients for t in c.timings]


def run_federation(
    target: str,
    clients: int,
    update: UpdateSource,
    timeout_s: float,
    on_round: Callable[[int], None] = lambda r: None,
    max_message_bytes: int = 4 * 1024 * 1024,
) -> FederationResult:
    """Run ``clients`` scripted clients as threads until the server says DONE to all."""
    fleet = [
        ScriptedFedClient(target, f"bench-{i:03d}", update, max_message_bytes=max_message_bytes)
        for i in range(clients)
    ]
    stop = threading.Event()
    deadline = time.perf_counter() + timeout_s
    threads = [
        threading.Thread(target=c.run, args=(stop, deadline), daemon=True, name=c.client_id)
        for c in fleet
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    seen_rounds: set[int] = set()
    try:
        while any(t.is_alive() for t in threads):
            for thread in threads:
                thread.join(0.2)
            done = set(FederationResult(fleet, 0.0).commit_times())
            for round_no in sorted(done - seen_rounds):
                on_round(round_no)
            seen_rounds |= done
            if time.perf_counter() > deadline + 30:
                break
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
        for client in fleet:
            client.close()
    return FederationResult(fleet, time.perf_counter() - started)
