"""A >= 200 MB model through the real gRPC path: chunked download, encrypted chunked upload,
validation and streaming aggregation, with message-size limits far below the payload."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from crossfed.common.crypto.upload_encryption import UploadKeyPair
from crossfed.server.checkpoints import CheckpointStore
from crossfed.server.coordinator_servicer import CoordinatorServicer
from crossfed.server.grpc_server import start_grpc_server
from crossfed.server.round_engine import RoundEngine
from crossfed.server.round_policy import RoundPolicy
from crossfed.server.state.memory import InMemoryStateStore
from crossfed.server.upload_receiver import UploadPolicy
from crossfed.v1 import coordinator_pb2
from grpc_fixtures import free_port
from scripted_client import ScriptedClient

MiB = 1024 * 1024


def test_200mb_model_download_and_encrypted_upload(tmp_path: Path) -> None:
    n = 26 * MiB // 4  # 2 x 104 MiB float32 = 208 MiB
    state = {"big.a": torch.rand(n), "big.b": torch.rand(n), "small.c": torch.zeros(3)}
    key = UploadKeyPair.generate()
    engine = RoundEngine(
        InMemoryStateStore(),
        CheckpointStore(tmp_path / "ckpt", keep_last=1),
        state,
        lambda k: k.split(".")[0],
        RoundPolicy(total_rounds=1, min_clients=1),
    )
    servicer = CoordinatorServicer(
        engine,
        UploadPolicy(max_payload_bytes=512 * MiB, allow_unencrypted=False, upload_key=key),
        chunk_size=1 * MiB,
    )
    running = start_grpc_server(
        servicer,
        f"127.0.0.1:{free_port()}",
        max_message_bytes=2 * MiB,
        server_credentials=None,
    )
    client = ScriptedClient(f"127.0.0.1:{running.port}", "big", max_message_bytes=2 * MiB)
    try:
        client.register()
        hb = client.heartbeat()
        assert hb.action == coordinator_pb2.ACTION_TRAIN
        t0 = time.perf_counter()
        got = client.download(1)
        t_down = time.perf_counter() - t0
        assert torch.equal(got["big.a"], state["big.a"])
        update = {k: v * 0.5 for k, v in got.items()}
        del got
        t0 = time.perf_counter()
        reply = client.upload(1, update, server_key=hb.upload_public_key, chunk_size=1 * MiB)
        t_up = time.perf_counter() - t0
        assert reply.accepted
        assert engine.wait_idle(60.0)  # the commit runs on the engine's committer thread
        assert engine.run.state == "completed"
        final = engine.global_state
        assert torch.allclose(final["big.b"], state["big.b"] * 0.5)
        print(f"208 MiB: download {t_down:.2f} s, encrypted upload+aggregate {t_up:.2f} s")
    finally:
        client.close()
        running.stop(1)


def test_uploads_in_flight_are_bounded(tmp_path: Path) -> None:
    state = {"m.a": torch.rand(64 * 1024)}
    engine = RoundEngine(
        InMemoryStateStore(),
        CheckpointStore(tmp_path / "ckpt"),
        state,
        lambda k: k.split(".")[0],
        RoundPolicy(total_rounds=1, min_clients=2),
    )
    servicer = CoordinatorServicer(
        engine,
        UploadPolicy(max_payload_bytes=8 * MiB, allow_unencrypted=True, upload_key=None),
        chunk_size=64 * 1024,
        max_concurrent_uploads=1,
        upload_slot_wait_s=0.3,
    )
    running = start_grpc_server(
        servicer, f"127.0.0.1:{free_port()}", max_message_bytes=2 * MiB, server_credentials=None
    )
    slow = ScriptedClient(f"127.0.0.1:{running.port}", "slow")
    fast = ScriptedClient(f"127.0.0.1:{running.port}", "fast")
    release = threading.Event()
    try:
        slow.register(), fast.register()
        slow.heartbeat()
        msgs = slow.upload_messages(1, state, chunk_size=64 * 1024)

        def stalled() -> Iterator[coordinator_pb2.UploadMessage]:
            yield msgs[0]
            yield msgs[1]
            release.wait(10)
            yield from msgs[2:]

        result: dict[str, object] = {}
        worker = threading.Thread(
            target=lambda: result.setdefault(
                "r", slow.stub.UploadUpdate(stalled(), metadata=slow.md, timeout=30)
            )
        )
        worker.start()
        time.sleep(0.5)  # the slow upload now holds the only slot
        with pytest.raises(grpc.RpcError) as err:
            fast.upload(1, state, chunk_size=64 * 1024)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        release.set()
        worker.join(10)
        assert result["r"].accepted  # type: ignore[attr-defined]
        assert fast.upload(1, state, chunk_size=64 * 1024).accepted  # slot free again
    finally:
        release.set()
        slow.close(), fast.close()
        running.stop(1)
