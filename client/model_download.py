"""Resumable download of the global model: feed chunks to the wire ChunkAssembler in order,
remember how far we got so an interrupted stream restarts at the next chunk index, and
verify size + SHA-256 at the end. The reassembly buffer comes from a pool kept across rounds
(`download_buffer_pool`): fresh pages cost more than the download itself."""

from __future__ import annotations

from dataclasses import dataclass, field

from crossfed.client.errors import PayloadIntegrityError
from crossfed.common.wire.chunk_stream import BufferPool, ChunkAssembler, ChunkFrame
from crossfed.common.wire.errors import WireError
from crossfed.v1 import common_pb2

DEFAULT_MAX_MODEL_BYTES = 2 * 1024**3


def download_buffer_pool(idle_s: float) -> BufferPool | None:
    """The client's pool of one reassembly buffer, kept ``idle_s`` seconds after a round's
    model is loaded (0: none). Idle, it is lazily freed (MADV_FREE), so keeping it costs no
    memory the kernel needs elsewhere. Separate-process benchmark, 100 MB, same session: a
    fresh buffer per download 340-401 MB/s, a warm one 981-1041 MB/s (BENCHMARKS.md)."""
    if idle_s <= 0:
        return None
    return BufferPool(max_idle=1, idle_s=idle_s, lazy_free=True)


@dataclass
class DownloadProgress:
    """Chunks of one round's global model received so far."""

    round_id: int
    max_payload_bytes: int = DEFAULT_MAX_MODEL_BYTES
    bytes_received: int = 0
    buffer_pool: BufferPool | None = field(default=None, repr=False)
    _assembler: ChunkAssembler = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.reset()

    @property
    def next_chunk(self) -> int:
        """Index to ask for when (re)starting the stream (chunks arrive strictly in order)."""
        return self._assembler.received_chunks

    @property
    def total(self) -> int | None:
        """ChunkFrame count the stream announced, None before the first chunk."""
        return self._assembler.expected_chunks

    @property
    def complete(self) -> bool:
        """True once every announced chunk has arrived."""
        return self._assembler.complete

    def add(self, chunk: common_pb2.TensorChunk | ChunkFrame) -> None:
        """Accept the next chunk; refuse a chunk of another round or an inconsistent one.

        A ``ChunkFrame`` (what GrpcTransport yields) is copied once, straight into the
        payload buffer; ``data`` of a protobuf chunk is read once (each access copies it).
        """
        if chunk.round and chunk.round != self.round_id:
            raise PayloadIntegrityError(
                f"chunk belongs to round {chunk.round}, expected round {self.round_id}"
            )
        frame = chunk if isinstance(chunk, ChunkFrame) else ChunkFrame.from_proto(chunk)
        try:
            self._assembler.add(frame)
        except WireError as exc:
            raise PayloadIntegrityError(f"global model of round {self.round_id}: {exc}") from exc
        self.bytes_received += len(frame.data)

    def reset(self) -> None:
        """Drop everything received (after an integrity failure)."""
        self._assembler = ChunkAssembler(self.max_payload_bytes, buffer_pool=self.buffer_pool)

    def payload(self, *, writable: bool = False) -> memoryview:
        """The whole verified payload, a view of the reassembly buffer (no copy:
        ``decode_tensors`` reads it directly; ``writable=True`` lets it decode zero-copy);
        raises if incomplete or corrupted."""
        try:
            return self._assembler.result_view(writable=writable)
        except WireError as exc:
            raise PayloadIntegrityError(f"global model of round {self.round_id}: {exc}") from exc
