"""A hostile client against the upload path's capacity: streams that send a header declaring
1 GiB and then nothing, four at once from one identity. Declared bytes reserve nothing, one
client holds one upload slot (a newer stream replaces its older one), and a stream idle past
transport.upload_idle_timeout_s is cancelled, so the honest upload goes through at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from crossfed.v1 import coordinator_pb2

from tests.support.reliability.attack_harness import (
    attack_server,
    record_attack,
    wait_for,
    wait_train,
)

IDLE_S = 2.0


def _stalled(
    round_no: int, num_samples: int, release: threading.Event, tag: int
) -> Iterator[coordinator_pb2.UploadMessage]:
    """A header declaring a 1 GiB payload, then silence until ``release``."""
    yield coordinator_pb2.UploadMessage(
        header=coordinator_pb2.UploadHeader(
            round=round_no,
            num_samples=num_samples,
            payload_size=1 << 30,
            payload_sha256=bytes(32),
            total_chunks=1 << 20,
            encrypted=False,
            upload_id=f"stall-{tag}",
        )
    )
    release.wait(120)


def test_stalled_uploads_hold_no_capacity_and_are_cancelled(tmp_path: Path) -> None:
    transport = {"chunk_size": 1024, "max_message_bytes": 1 << 20, "upload_idle_timeout_s": IDLE_S}
    with attack_server(tmp_path, {"transport": transport}, rounds=2, min_clients=2) as srv:
        attacker, honest = srv.client("attacker", 1), srv.client("honest", 2)
        for c in (attacker, honest):
            c.register()
        for c in (attacker, honest):
            wait_train(c, 1)
        start = honest.download(1)
        servicer = srv.server.servicer if srv.server else None
        assert servicer is not None
        release = threading.Event()
        calls = []
        try:
            for tag in range(4):  # four streams of one client, one after the other
                calls.append(
                    attacker.stub.UploadUpdate.future(
                        _stalled(1, attacker.num_samples, release, tag), timeout=120
                    )
                )
                wait_for(
                    lambda: servicer._upload_admission.in_flight[0] >= 1, 10, "a stream admitted"
                )
            held = servicer._upload_admission.in_flight  # (uploads, bytes) in flight
            began = time.monotonic()
            assert honest.upload(1, start).accepted  # no wait: nothing is reserved
            honest_s = time.monotonic() - began
            ends = [call.exception(timeout=30) for call in calls]
        finally:
            release.set()
        assert held[1] == 0 and held[0] <= 1, held  # 1 GiB declared, 0 bytes admitted
        assert all(
            isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]
            for e in ends
        ), ends
        wait_for(lambda: servicer._upload_admission.in_flight == (0, 0), 10, "slots released")

        def stalled() -> list[str]:
            events = srv.engine.store.events_after(0, 10_000)
            return [e.client_id for e in events if e.kind == "upload_stalled"]

        wait_for(lambda: bool(stalled()), 10, "the upload_stalled event")  # written after
        assert stalled() == ["attacker"]  # the cancel: one stalled, three replaced
    record_attack(
        "stalled_uploads",
        "one client opens 4 UploadUpdate streams, each a header declaring 1 GiB, then holds "
        "them open without sending",
        "declared bytes reserve nothing; a newer stream of the client replaces the older; an "
        f"idle stream is cancelled after upload_idle_timeout_s ({IDLE_S:g} s here) and its "
        "slot freed (event upload_stalled, metric crossfed_uploads_stalled)",
        f"in flight while held: {held[0]} upload, {held[1]} bytes; honest upload accepted in "
        f"{honest_s:.2f} s; all 4 streams CANCELLED (3 replaced, 1 idle); slots back to 0",
    )
