"""The /metrics endpoint of a real server on 127.0.0.1, scraped over HTTP before and after a
round driven through gRPC: round/upload counters, bytes in/out per method, rejections by
reason, durations and client gauges all moved."""

from __future__ import annotations

import hashlib
import socket
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from crossfed.common.config import ServerConfig
from crossfed.server.server_app import CoordinatorServer, ServerOptions
from crossfed.v1 import common_pb2, coordinator_pb2
from prometheus_client.parser import text_string_to_metric_families
from scripted_client import ScriptedClient

SMALL_MODEL = {"text_dim": 16, "image_dim": 8, "hidden_dim": 16, "num_classes": 3}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _get(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return float(samples.get((name, tuple(sorted(labels.items()))), 0.0))


def _wait_scrape(port: int, name: str, at_least: float, **labels: str) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + 10
    while True:
        samples = _scrape(port)
        if _get(samples, name, **labels) >= at_least or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_metrics_scraped_after_a_round(tmp_path: Path) -> None:
    metrics_port = _free_port()
    cfg = ServerConfig.model_validate(
        {
            "listen": f"127.0.0.1:{_free_port()}",
            "state_dir": str(tmp_path / "state"),
            "model": SMALL_MODEL,
            "rounds": {"rounds": 2, "min_clients": 2, "round_deadline_s": 30.0},
            "tls": {"insecure": True},
            "transport": {"chunk_size": 4096, "max_message_bytes": 1024 * 1024},
            "metrics_port": metrics_port,
        }
    )
    server = CoordinatorServer.create(
        cfg,
        ServerOptions(tick_interval_s=0.05, allow_unencrypted_uploads=True, shutdown_grace_s=0.5),
    )
    port = server.start()
    clients = [ScriptedClient(f"127.0.0.1:{port}", cid) for cid in ("m1", "m2")]
    try:
        before = _scrape(metrics_port)
        assert _get(before, "crossfed_rounds_committed_total") == 0
        assert _get(before, "crossfed_uploads_accepted_total") == 0
        assert _get(before, "crossfed_run_state", state="running") == 1

        for client in clients:
            client.register()
        for client in clients:
            client.heartbeat()
        model_bytes = 0
        for client in clients:
            hb = client.heartbeat()
            assert hb.action == coordinator_pb2.ACTION_TRAIN and hb.round == 1
            state = client.download(1)
            model_bytes = sum(t.numel() * t.element_size() for t in state.values())
            assert client.upload(1, state, chunk_size=4096).accepted
        assert server.engine.wait_idle(30.0)
        assert server.engine.run.last_committed_round == 1

        # a late upload for the closed round 1 is refused: FAILED_PRECONDITION
        late = clients[0].upload_messages(1, clients[0].download(1), chunk_size=4096)
        with pytest.raises(grpc.RpcError) as err:
            clients[0].stub.UploadUpdate(iter(late), metadata=clients[0].md, timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # a truncated stream for the open round 2 (if selected): DATA_LOSS
        assert _truncated_upload(clients[1], 2)

        after = _wait_scrape(metrics_port, "crossfed_rounds_committed_total", 1)
        assert _get(after, "crossfed_rounds_committed_total") == 1
        assert _get(after, "crossfed_uploads_accepted_total") == 2
        assert _get(after, "crossfed_last_committed_round") == 1
        assert _get(after, "crossfed_current_round") >= 1
        assert _get(after, "crossfed_aggregation_seconds_count") == 1
        assert _get(after, "crossfed_round_duration_seconds_count", outcome="committed") == 1
        assert _get(after, "crossfed_uploads_rejected_total", reason="failed_precondition") == 1
        assert _get(after, "crossfed_uploads_rejected_total", reason="data_loss") == 1
        upload_in = _get(
            after, "crossfed_grpc_received_bytes_total", method="Coordinator/UploadUpdate"
        )
        assert upload_in >= 2 * model_bytes  # two accepted uploads (+ refused ones' headers)
        download_out = _get(
            after, "crossfed_grpc_sent_bytes_total", method="Coordinator/DownloadGlobalModel"
        )
        assert download_out >= 3 * model_bytes
        assert (
            _get(after, "crossfed_grpc_handled_total", method="Coordinator/Register", code="ok")
            == 2
        )
        clients_total = sum(v for (name, _labels), v in after.items() if name == "crossfed_clients")
        assert clients_total == 2
    finally:
        for client in clients:
            client.close()
        server.stop()
    with pytest.raises(OSError):  # the endpoint is gone with the server
        _scrape(metrics_port)


def _truncated_upload(client: ScriptedClient, round_no: int) -> bool:
    """Send round ``round_no``'s model with its last chunk missing; True if refused DATA_LOSS."""
    hb = client.heartbeat()
    if hb.action != coordinator_pb2.ACTION_TRAIN or hb.round != round_no:
        return False
    body = bytes(8192 + 10)
    digest = hashlib.sha256(body).digest()
    header = coordinator_pb2.UploadHeader(
        round=round_no,
        num_samples=client.num_samples,
        payload_size=len(body),
        payload_sha256=digest,
        total_chunks=3,
        encrypted=False,
        upload_id=uuid.uuid4().hex,
    )
    messages = [coordinator_pb2.UploadMessage(header=header)] + [
        coordinator_pb2.UploadMessage(
            chunk=common_pb2.TensorChunk(
                index=i,
                total=3,
                data=body[i * 4096 : (i + 1) * 4096],
                payload_sha256=digest,
                payload_size=len(body),
                round=round_no,
            )
        )
        for i in range(2)
    ]
    with pytest.raises(grpc.RpcError) as err:
        client.stub.UploadUpdate(iter(messages), metadata=client.md, timeout=10)
    return bool(err.value.code() == grpc.StatusCode.DATA_LOSS)
