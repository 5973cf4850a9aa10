"""Many lightweight Coordinator clients in one asyncio loop (grpc.aio, one channel each, no
training): register, heartbeat, download, exchange projections, upload a known constant,
until DONE. Records every RPC's latency and every status it had to ride out."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import grpc
from crossfed.common.wire.tensor_codec import decode_tensors, encode_tensors
from crossfed.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

from tests.support.reliability.reliability_harness import (
    PROJECTION_SIGMA,
    constant_update,
    projection_payload,
    samples_of,
    upload_value,
)

#: statuses a client under load retries (server busy, round moved on, restart)
RETRY_CODES = frozenset(
    {
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)
AIO_CORE_ERROR = "Internal error from Core"


@dataclass
class LoadStats:
    """Latencies per RPC (seconds) and statuses seen, over all clients."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    retried: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    uploads_accepted: int = 0
    duplicates: int = 0
    done_clients: int = 0

    def percentile(self, rpc: str, q: float) -> float:
        values = sorted(self.latencies.get(rpc, []))
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(q * len(values)))]

    def all_latencies(self) -> list[float]:
        return sorted(v for vals in self.latencies.values() for v in vals)


class LoadClient:
    """One simulated client."""

    def __init__(self, target: str, index: int, stats: LoadStats, chunk_size: int) -> None:
        self.index = index
        self.client_id = f"c{index}"
        self.stats = stats
        self.chunk_size = chunk_size
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.md = (("x-crossfed-client-id", self.client_id),)
        self.current = ""

    async def _timed(self, rpc: str, coro: object) -> object:
        self.current = rpc
        started = time.perf_counter()
        result = await coro  # type: ignore[misc]
        self.stats.latencies[rpc].append(time.perf_counter() - started)
        return result

    async def _download(self, round_no: int) -> bytes:
        self.current = "DownloadGlobalModel"
        started = time.perf_counter()
        parts, digest = [], b""
        call = self.stub.DownloadGlobalModel(
            coordinator_pb2.DownloadRequest(round=round_no), metadata=self.md, timeout=60
        )
        async for chunk in call:
            parts.append(chunk.data)
            digest = chunk.payload_sha256
        payload = b"".join(parts)
        if hashlib.sha256(payload).digest() != digest:
            raise AssertionError(f"{self.client_id}: bad model digest")
        self.stats.latencies["DownloadGlobalModel"].append(time.perf_counter() - started)
        return payload

    def _upload_messages(self, round_no: int, payload: bytes) -> list[object]:
        digest = hashlib.sha256(payload).digest()
        size = self.chunk_size
        total = max(1, -(-len(payload) // size))
        out: list[object] = [
            coordinator_pb2.UploadMessage(
                header=coordinator_pb2.UploadHeader(
                    round=round_no, num_samples=samples_of(self.index),
                    payload_size=len(payload), payload_sha256=digest, total_chunks=total,
                    upload_id=f"{self.client_id}-r{round_no}",
                )
            )
        ]  # fmt: skip
        for i in range(total):
            out.append(
                coordinator_pb2.UploadMessage(
                    chunk=common_pb2.TensorChunk(
                        index=i, total=total, data=payload[i * size : (i + 1) * size],
                        payload_sha256=digest, payload_size=len(payload), round=round_no,
                    )
                )
            )  # fmt: skip
        return out

    async def _round(self, round_no: int) -> None:
        model = decode_tensors(await self._download(round_no))
        proj = projection_payload(self.index)
        await self._timed(
            "ExchangeProjections",
            self.stub.ExchangeProjections(
                coordinator_pb2.ProjectionExchangeRequest(
                    round=round_no,
                    projections=common_pb2.TensorPayload(
                        safetensors=proj, payload_sha256=hashlib.sha256(proj).digest()
                    ),
                    noise_multiplier=PROJECTION_SIGMA,  # the mandated noise, as in the payload
                    clip_norm=1.0,
                ),
                metadata=self.md,
                timeout=30,
            ),
        )
        update = encode_tensors(constant_update(model, upload_value(self.index, round_no)))
        messages = self._upload_messages(round_no, update)
        reply = await self._timed(
            "UploadUpdate",
            self.stub.UploadUpdate(iter(messages), metadata=self.md, timeout=60),
        )
        assert isinstance(reply, coordinator_pb2.UploadResponse)
        if reply.accepted:
            self.stats.uploads_accepted += 1
            self.stats.duplicates += int(reply.duplicate)

    async def run(self, deadline: float) -> None:
        registered = False
        try:
            while time.monotonic() < deadline:
                try:
                    if not registered:
                        await self._timed(
                            "Register",
                            self.stub.Register(
                                coordinator_pb2.RegisterRequest(
                                    modality=1,  # type: ignore[arg-type]
                                    num_samples=samples_of(self.index),
                                ),
                                metadata=self.md,
                                timeout=30,
                            ),
                        )
                        registered = True
                    hb = await self._timed(
                        "Heartbeat",
                        self.stub.Heartbeat(
                            coordinator_pb2.HeartbeatRequest(), metadata=self.md, timeout=30
                        ),
                    )
                    assert isinstance(hb, coordinator_pb2.HeartbeatResponse)
                    if hb.action == coordinator_pb2.ACTION_DONE:
                        self.stats.done_clients += 1
                        return
                    if hb.action == coordinator_pb2.ACTION_TRAIN:
                        await self._round(int(hb.round))
                        continue
                    if hb.action == coordinator_pb2.ACTION_REGISTER:
                        registered = False
                    await asyncio.sleep((hb.poll_after_ms or 500) / 1000.0)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.INTERNAL and exc.details() == AIO_CORE_ERROR:
                        # grpc.aio client race: the server ended a client-streaming call early
                        # (e.g. RESOURCE_EXHAUSTED at its RPC limit) while the request iterator
                        # was still being written; no server-side error. Retried, counted.
                        self.stats.retried[f"INTERNAL(aio core) on {self.current}"] += 1
                        await asyncio.sleep(0.2)
                        continue
                    if exc.code() not in RETRY_CODES:
                        self.stats.errors.append(
                            f"{self.client_id} {self.current}: {exc.code().name}: {exc.details()}"
                        )
                        return
                    self.stats.retried[exc.code().name] += 1
                    await asyncio.sleep(0.2)
            self.stats.errors.append(f"{self.client_id}: not DONE before the deadline")
        finally:
            await self.channel.close()


async def run_clients(
    target: str, count: int, timeout_s: float, chunk_size: int = 1024
) -> LoadStats:
    """Run ``count`` clients to DONE (or ``timeout_s``); return their statistics."""
    stats = LoadStats()
    deadline = time.monotonic() + timeout_s
    clients = [LoadClient(target, i, stats, chunk_size) for i in range(count)]
    await asyncio.gather(*(c.run(deadline) for c in clients))
    return stats
