"""Resumable download of the global model: collect chunks in order, remember how far we got so
an interrupted stream restarts at the next chunk index, and verify size + SHA-256 at the end."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from crossfed.client.errors import PayloadIntegrityError
from crossfed.v1 import common_pb2


@dataclass
class DownloadProgress:
    """Chunks of one round's global model received so far."""

    round_id: int
    parts: list[bytes] = field(default_factory=list)
    total: int | None = None
    payload_sha256: bytes = b""
    payload_size: int = 0
    bytes_received: int = 0

    @property
    def next_chunk(self) -> int:
        """Index to ask for when (re)starting the stream."""
        return len(self.parts)

    @property
    def complete(self) -> bool:
        """True once every announced chunk has arrived."""
        return self.total is not None and len(self.parts) == self.total

    def add(self, chunk: common_pb2.TensorChunk) -> None:
        """Append the next chunk; refuse out-of-order or inconsistent chunks."""
        if chunk.round and chunk.round != self.round_id:
            raise PayloadIntegrityError(
                f"chunk belongs to round {chunk.round}, expected round {self.round_id}"
            )
        if chunk.total == 0:
            raise PayloadIntegrityError("chunk announces total=0")
        if self.total is None:
            self.total = chunk.total
            self.payload_sha256 = bytes(chunk.payload_sha256)
            self.payload_size = int(chunk.payload_size)
        elif (
            chunk.total != self.total
            or bytes(chunk.payload_sha256) != self.payload_sha256
            or chunk.payload_size != self.payload_size
        ):
            # A different payload behind the same round (server rebuilt it): start over.
            raise PayloadIntegrityError(
                f"round {self.round_id}: chunk {chunk.index} describes a different payload "
                "than the chunks before it"
            )
        if chunk.index != self.next_chunk:
            raise PayloadIntegrityError(
                f"round {self.round_id}: expected chunk {self.next_chunk}, got {chunk.index}"
            )
        self.parts.append(bytes(chunk.data))
        self.bytes_received += len(chunk.data)

    def reset(self) -> None:
        """Drop everything received (after an integrity failure)."""
        self.parts.clear()
        self.total = None
        self.payload_sha256 = b""
        self.payload_size = 0

    def payload(self) -> bytes:
        """The whole verified payload; raises if incomplete or corrupted."""
        if not self.complete:
            raise PayloadIntegrityError(
                f"round {self.round_id}: download incomplete ({self.next_chunk}/{self.total})"
            )
        data = b"".join(self.parts)
        if len(data) != self.payload_size:
            raise PayloadIntegrityError(
                f"round {self.round_id}: payload is {len(data)} bytes, "
                f"announced {self.payload_size}"
            )
        if hashlib.sha256(data).digest() != self.payload_sha256:
            raise PayloadIntegrityError(f"round {self.round_id}: payload SHA-256 mismatch")
        return data
