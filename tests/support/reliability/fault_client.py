"""A scripted Coordinator client process that stops dead at a chosen point, for the client
fault scenarios: it registers, waits for TRAIN, then either hangs inside the model download
(after its first chunk) or inside the upload stream (after the header and two chunks), and
prints ``AT <point>`` so the test can SIGKILL it exactly there. No torch import: the process
starts in well under a second.

Usage: fault_client.py TARGET CLIENT_ID NUM_SAMPLES {download,upload}
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import grpc
from crossfed.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

FOREVER = threading.Event()


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    """Run until the chosen point, announce it, and block there until killed."""
    target, client_id, num_samples, point = argv[0], argv[1], int(argv[2]), argv[3]
    md = (("x-crossfed-client-id", client_id),)
    channel = grpc.insecure_channel(target)
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    stub.Register(
        coordinator_pb2.RegisterRequest(modality=1, num_samples=num_samples),  # type: ignore[arg-type]
        metadata=md,
        timeout=10,
    )
    _say("REGISTERED")
    while True:
        hb = stub.Heartbeat(coordinator_pb2.HeartbeatRequest(), metadata=md, timeout=10)
        if hb.action == coordinator_pb2.ACTION_TRAIN:
            break
        time.sleep(0.05)
    round_no = int(hb.round)
    stream = stub.DownloadGlobalModel(
        coordinator_pb2.DownloadRequest(round=round_no), metadata=md, timeout=120
    )
    if point == "download":
        next(stream)
        _say("AT download")
        FOREVER.wait()
    payload = b"".join(chunk.data for chunk in stream)
    digest = hashlib.sha256(payload).digest()
    size = 256
    total = -(-len(payload) // size)

    def messages() -> Iterator[coordinator_pb2.UploadMessage]:
        yield coordinator_pb2.UploadMessage(
            header=coordinator_pb2.UploadHeader(
                round=round_no,
                num_samples=num_samples,
                payload_size=len(payload),
                payload_sha256=digest,
                total_chunks=total,
                upload_id=uuid.uuid4().hex,
            )
        )
        for index in range(2):
            yield coordinator_pb2.UploadMessage(
                chunk=common_pb2.TensorChunk(
                    index=index,
                    total=total,
                    data=payload[index * size : (index + 1) * size],
                    payload_sha256=digest,
                    payload_size=len(payload),
                    round=round_no,
                )
            )
        _say("AT upload")
        FOREVER.wait()

    stub.UploadUpdate(messages(), metadata=md, timeout=120)
    return 1  # unreachable unless the server answered a half stream


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
