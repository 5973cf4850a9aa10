"""Splitting a payload into fixed-size chunks and reassembling it, verified, on the other side.

Every chunk carries its index, the chunk count and the size and SHA-256 of the *whole* payload,
so a receiver can reject a bad stream at its first inconsistent chunk, size its buffer once and
check integrity at the end. Layout: every chunk but the last holds the same number of bytes; the
last holds the rest (an empty payload is one empty chunk).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from crossfed.common.wire.errors import (
    DigestMismatchError,
    DuplicateChunkError,
    MalformedPayloadError,
    MissingChunkError,
    OutOfOrderChunkError,
    PayloadTooLargeError,
)

__all__ = ["SHA256_BYTES", "Chunk", "ChunkAssembler", "split_buffers", "split_payload"]

SHA256_BYTES = 32


@dataclass(frozen=True)
class Chunk:
    """One piece of a payload as it travels (maps 1:1 onto the protobuf chunk message)."""

    index: int
    total: int
    data: bytes
    payload_sha256: bytes
    payload_size: int


def split_payload(
    payload: bytes | bytearray | memoryview,
    chunk_size: int,
    *,
    payload_sha256: bytes | None = None,
) -> Iterator[Chunk]:
    """Yield the chunks of ``payload``, each at most ``chunk_size`` bytes.

    ``payload_sha256`` may be passed when already known (``encode_tensors_with_digest``) to
    avoid hashing the payload a second time. A ``bytes`` payload that fits one chunk is passed
    through without copying; otherwise each chunk is one copy of its slice (protobuf needs
    ``bytes``), made lazily so a streaming consumer holds one chunk at a time.
    """
    if isinstance(payload, bytes) and type(chunk_size) is int and len(payload) <= chunk_size:
        digest = _checked_digest(payload_sha256) or hashlib.sha256(payload).digest()
        yield Chunk(0, 1, payload, digest, len(payload))
        return
    yield from split_buffers([payload], chunk_size, payload_sha256=payload_sha256)


def _checked_digest(digest: bytes | None) -> bytes | None:
    if digest is not None and (not isinstance(digest, bytes) or len(digest) != SHA256_BYTES):
        got = len(digest) if isinstance(digest, bytes) else type(digest).__name__
        raise ValueError(f"payload_sha256 must be {SHA256_BYTES} bytes, got {got}")
    return digest


def split_buffers(
    buffers: Sequence[bytes | bytearray | memoryview],
    chunk_size: int,
    *,
    payload_sha256: bytes | None = None,
) -> Iterator[Chunk]:
    """Chunk the concatenation of ``buffers`` without ever building that concatenation.

    Lets a sender stream a payload that exists as pieces (a header and tensor memory, see
    ``tensor_codec.payload_pieces``): one copy per chunk instead of a whole-payload copy first.
    The buffers must not change until the iterator is exhausted, or the digest will not match.
    """
    if type(chunk_size) is not int or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    try:
        views = [memoryview(b).cast("B") for b in buffers]
    except TypeError as exc:
        raise TypeError(f"payload pieces must be contiguous bytes-like objects: {exc}") from exc
    size = sum(v.nbytes for v in views)
    digest = _checked_digest(payload_sha256)
    if digest is None:
        hasher = hashlib.sha256()
        for view in views:
            hasher.update(view)
        digest = hasher.digest()
    total = max(1, -(-size // chunk_size))
    views = [v for v in views if v.nbytes]
    piece, offset = 0, 0  # position in `views`
    for index in range(total):
        want = min(chunk_size, size - index * chunk_size)
        parts: list[memoryview] = []
        while want:
            take = min(want, views[piece].nbytes - offset)
            parts.append(views[piece][offset : offset + take])
            want -= take
            offset += take
            if offset == views[piece].nbytes:
                piece, offset = piece + 1, 0
        data = b"".join(parts) if len(parts) != 1 else parts[0].tobytes()
        yield Chunk(index, total, data, digest, size)


#: Payloads at least this large are hashed on a pool thread while further chunks are copied in.
BACKGROUND_HASH_MIN_BYTES = 8 * 1024 * 1024
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _hash_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="crossfed-sha256"
            )
        return _pool


class _HashLane:
    """Feeds byte ranges, in order, to one SHA-256 on a pool thread while the caller goes on.

    hashlib releases the GIL while hashing, so on a second core the digest of a large payload
    is ready almost as soon as its last chunk has been copied in.
    """

    def __init__(self, background: bool) -> None:
        self._hasher = hashlib.sha256()
        self._background = background
        self._lock = threading.Lock()
        self._pending: deque[memoryview] = deque()
        self._running = False
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None

    def feed(self, data: memoryview) -> None:
        if not self._background:
            self._hasher.update(data)
            return
        with self._lock:
            self._pending.append(data)
            if self._running:
                return
            self._running = True
            self._idle.clear()
        try:
            _hash_pool().submit(self._drain)
        except RuntimeError:  # pool shut down (interpreter exit): hash here instead
            self._drain()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._pending or self._error is not None:
                    self._running = False
                    self._idle.set()
                    return
                data = self._pending.popleft()
            try:
                self._hasher.update(data)
            except BaseException as exc:  # noqa: BLE001 - re-raised by digest()
                self._error = exc

    def digest(self) -> bytes:
        self._idle.wait()
        if self._error is not None:
            raise self._error
        return self._hasher.digest()


@dataclass
class _Stream:
    """What the first chunk of a stream declared; every later chunk must agree with it."""

    total: int
    payload_sha256: bytes
    payload_size: int
    buffer: torch.Tensor  # uint8, uninitialised: pages are touched once, by the chunk copies
    chunk_len: int | None = None  # length of every non-last chunk, once one has been seen
    next_index: int = 0  # lowest index not yet received
    ahead: set[int] = field(default_factory=set)  # received indices above next_index
    hashed_upto: int = 0
    hasher: _HashLane = field(default_factory=lambda: _HashLane(background=False))


class ChunkAssembler:
    """Reassembles one payload from its chunks, rejecting any inconsistency as early as possible.

    ``reorder_window`` is how far past the lowest missing index a chunk may arrive (0: strictly in
    order). The payload buffer is allocated once, at the first chunk, after its declared size was
    checked against ``max_payload_bytes``; chunks are written into it in place and hashed as soon
    as they extend the contiguous prefix (on a pool thread for payloads of at least
    ``BACKGROUND_HASH_MIN_BYTES``), so the final digest check costs little extra time.
    Not thread-safe: feed one assembler from one thread (one gRPC stream) at a time.
    """

    def __init__(self, max_payload_bytes: int, reorder_window: int = 0) -> None:
        if type(max_payload_bytes) is not int or max_payload_bytes < 0:
            raise ValueError(f"max_payload_bytes must be an int >= 0, got {max_payload_bytes!r}")
        if type(reorder_window) is not int or reorder_window < 0:
            raise ValueError(f"reorder_window must be an int >= 0, got {reorder_window!r}")
        self.max_payload_bytes = max_payload_bytes
        self.reorder_window = reorder_window
        self._stream: _Stream | None = None
        self._received = 0
        self._result: memoryview | None = None

    # ------------------------------------------------------------------ state

    @property
    def complete(self) -> bool:
        """True once every chunk of the payload has been received (not yet verified)."""
        return self._stream is not None and self._stream.next_index == self._stream.total

    @property
    def received_chunks(self) -> int:
        """How many chunks have been accepted so far."""
        return self._received

    @property
    def expected_chunks(self) -> int | None:
        """The chunk count the stream declared, or None before the first chunk."""
        return None if self._stream is None else self._stream.total

    # ------------------------------------------------------------------ adding

    def _start(self, chunk: Chunk) -> _Stream:
        size, total = chunk.payload_size, chunk.total
        if type(size) is not int or size < 0:
            raise MalformedPayloadError(f"chunk {chunk.index}: payload_size {size!r} is not >= 0")
        if size > self.max_payload_bytes:
            raise PayloadTooLargeError(
                f"chunk {chunk.index} declares a {size}-byte payload; "
                f"the limit is {self.max_payload_bytes} bytes"
            )
        if type(total) is not int or not 1 <= total <= max(1, size):
            raise MalformedPayloadError(
                f"chunk {chunk.index}: total {total!r} chunks is impossible for a "
                f"{size}-byte payload (expected 1..{max(1, size)})"
            )
        digest = chunk.payload_sha256
        if not isinstance(digest, bytes) or len(digest) != SHA256_BYTES:
            got = len(digest) if isinstance(digest, bytes) else type(digest).__name__
            raise MalformedPayloadError(
                f"chunk {chunk.index}: payload_sha256 must be {SHA256_BYTES} bytes, got {got}"
            )
        buffer = torch.empty(size, dtype=torch.uint8)
        lane = _HashLane(background=size >= BACKGROUND_HASH_MIN_BYTES)
        return _Stream(
            total=total, payload_sha256=digest, payload_size=size, buffer=buffer, hasher=lane
        )

    def _check_agrees(self, stream: _Stream, chunk: Chunk) -> None:
        for name, expected, got in (
            ("total", stream.total, chunk.total),
            ("payload_size", stream.payload_size, chunk.payload_size),
            ("payload_sha256", stream.payload_sha256, chunk.payload_sha256),
        ):
            if got != expected:
                said, came = (
                    (expected.hex()[:16] + "...", got.hex()[:16] + "...")
                    if isinstance(expected, bytes) and isinstance(got, bytes)
                    else (repr(expected), repr(got))
                )
                raise MalformedPayloadError(
                    f"chunk {chunk.index}: {name} is {came}, but earlier chunks said {said}"
                )

    def _check_position(self, stream: _Stream, index: object) -> int:
        if type(index) is not int or not 0 <= index < stream.total:
            raise MalformedPayloadError(
                f"chunk index {index!r} is outside 0..{stream.total - 1} "
                f"(the stream has {stream.total} chunks)"
            )
        if index < stream.next_index or index in stream.ahead:
            raise DuplicateChunkError(f"chunk {index} of {stream.total} arrived twice")
        limit = stream.next_index + self.reorder_window
        if index > limit:
            raise OutOfOrderChunkError(
                f"chunk {index} of {stream.total} arrived while chunk {stream.next_index} is "
                f"still missing; reorder window {self.reorder_window} allows at most "
                f"chunk {limit}"
            )
        return index

    def _place(self, stream: _Stream, index: int, length: int) -> int:
        """Check the chunk's length against the layout; return its byte offset.

        Every chunk but the last holds ``chunk_len`` bytes. The first chunk to arrive fixes
        ``chunk_len`` (a last chunk fixes it too: the others must split the rest evenly).
        """
        size, total = stream.payload_size, stream.total
        is_last = index == total - 1
        if stream.chunk_len is None:
            if total == 1:
                chunk_len = size
            elif is_last:
                rest = size - length
                if length < 1 or rest % (total - 1) or length > rest // (total - 1):
                    raise MalformedPayloadError(
                        f"last chunk {index} of {total} holds {length} bytes; the other "
                        f"{total - 1} chunks cannot hold the remaining {rest} bytes of a "
                        f"{size}-byte payload in equal chunks at least that long"
                    )
                chunk_len = rest // (total - 1)
            else:
                if length < 1 or -(-size // length) != total:
                    raise MalformedPayloadError(
                        f"chunk {index} of {total} holds {length} bytes; chunks of that size "
                        f"cannot make a {size}-byte payload in {total} chunks"
                    )
                chunk_len = length
            stream.chunk_len = chunk_len
        chunk_len = stream.chunk_len
        expected = size - (total - 1) * chunk_len if is_last else chunk_len
        if length != expected:
            raise MalformedPayloadError(
                f"chunk {index} of {total} holds {length} bytes, expected {expected} "
                f"(chunks of {chunk_len} bytes, {size}-byte payload)"
            )
        return index * chunk_len

    def add(self, chunk: Chunk) -> None:
        """Accept the next chunk, or raise a ``WireError`` saying what is wrong with it."""
        if self._result is not None:
            raise DuplicateChunkError(
                f"chunk {chunk.index} arrived after the payload was already complete"
            )
        if not isinstance(chunk.data, bytes | bytearray | memoryview):
            raise MalformedPayloadError(
                f"chunk {chunk.index}: data must be bytes, got {type(chunk.data).__name__}"
            )
        try:
            data = memoryview(chunk.data).cast("B")
        except TypeError as exc:
            raise MalformedPayloadError(f"chunk {chunk.index}: data is not contiguous") from exc
        if data.nbytes > self.max_payload_bytes:
            raise PayloadTooLargeError(
                f"chunk {chunk.index} alone holds {data.nbytes} bytes; "
                f"the payload limit is {self.max_payload_bytes} bytes"
            )
        stream = self._stream
        if stream is None:
            stream = self._start(chunk)
        else:
            self._check_agrees(stream, chunk)
        index = self._check_position(stream, chunk.index)
        offset = self._place(stream, index, data.nbytes)
        self._stream = stream  # only now: a rejected first chunk leaves the assembler fresh
        if data.nbytes:
            stream.buffer[offset : offset + data.nbytes].numpy()[:] = data
        self._received += 1
        stream.ahead.add(index)
        while stream.next_index in stream.ahead:
            stream.ahead.remove(stream.next_index)
            stream.next_index += 1
        self._hash_prefix(stream)

    def _hash_prefix(self, stream: _Stream) -> None:
        """Feed the newly contiguous bytes to the running SHA-256."""
        if stream.next_index == stream.total:
            upto = stream.payload_size
        else:
            upto = stream.next_index * (stream.chunk_len or 0)
        if upto > stream.hashed_upto:
            stream.hasher.feed(stream.buffer[stream.hashed_upto : upto].numpy().data)
            stream.hashed_upto = upto

    # ------------------------------------------------------------------ results

    def result_view(self, *, writable: bool = False) -> memoryview:
        """The verified payload as a view of the assembler's buffer (no copy).

        Raises MissingChunkError if chunks are missing, DigestMismatchError if the bytes do not
        hash to the declared SHA-256. ``writable=True`` gives a view the caller may modify, e.g.
        for zero-copy ``decode_tensors(view, copy=False)``; later results reflect such changes.
        """
        if self._result is None:
            self._result = self._verified()
        return self._result if writable else self._result.toreadonly()

    def _verified(self) -> memoryview:
        stream = self._stream
        if stream is None:
            raise MissingChunkError("no chunk has arrived yet")
        if not self.complete:
            missing = [i for i in range(stream.next_index, stream.total) if i not in stream.ahead]
            shown = ", ".join(str(i) for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise MissingChunkError(
                f"payload incomplete: {len(missing)} of {stream.total} chunks missing ({shown})"
            )
        digest = stream.hasher.digest()
        if digest != stream.payload_sha256:
            raise DigestMismatchError(
                f"payload of {stream.payload_size} bytes hashes to sha256 {digest.hex()}, "
                f"but its chunks declared {stream.payload_sha256.hex()}"
            )
        return stream.buffer.numpy().data.cast("B")

    def result(self) -> bytes:
        """The verified payload as ``bytes`` (one copy; ``result_view`` avoids it)."""
        return self.result_view().tobytes()
