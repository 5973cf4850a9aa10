"""chunk_stream: split/reassemble round trips (in order and within a reorder window), rejections."""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import time

import pytest
import torch
from crossfed.common.wire import chunk_stream as chunking
from crossfed.common.wire.chunk_stream import (
    ChunkAssembler,
    ChunkFrame,
    receive_payload,
    split_buffers,
    split_payload,
)
from crossfed.common.wire.errors import (
    DigestMismatchError,
    DuplicateChunkError,
    MalformedPayloadError,
    MissingChunkError,
    OutOfOrderChunkError,
    PayloadTooLargeError,
)
from crossfed.common.wire.tensor_codec import (
    decode_tensors,
    encode_tensor_chunks,
    encode_tensors,
    encode_tensors_with_digest,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.wire_strategies import metadata_maps, same_bytes, tensor_sets


@st.composite
def arrival_orders(draw: st.DrawFn, total: int, window: int) -> list[int]:
    """A delivery order a sender with at most `window` chunks of reordering could produce."""
    sent: set[int] = set()
    order: list[int] = []
    lowest = 0
    while len(order) < total:
        allowed = [i for i in range(lowest, min(total, lowest + window + 1)) if i not in sent]
        pick = draw(st.sampled_from(allowed))
        sent.add(pick)
        order.append(pick)
        while lowest in sent:
            lowest += 1
    return order


@settings(max_examples=60, deadline=None)
@given(
    tensors=tensor_sets(),
    metadata=metadata_maps,
    chunk_size=st.integers(1, 700),
    window=st.integers(0, 4),
    data=st.data(),
)
def test_tensors_survive_encode_split_reorder_reassemble_decode(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None,
    chunk_size: int,
    window: int,
    data: st.DataObject,
) -> None:
    encoded = encode_tensors_with_digest(tensors, metadata)
    chunks = list(split_payload(encoded.data, chunk_size, payload_sha256=encoded.sha256))
    assert all(len(c.data) <= chunk_size for c in chunks)
    assembler = ChunkAssembler(max_payload_bytes=len(encoded.data), reorder_window=window)
    for index in data.draw(arrival_orders(len(chunks), window)):
        assert not assembler.complete
        assembler.add(chunks[index])
    assert assembler.complete
    assert assembler.result() == encoded.data
    decoded = decode_tensors(assembler.result_view())
    assert all(same_bytes(decoded[k], t) for k, t in tensors.items())


@settings(max_examples=100, deadline=None)
@given(payload=st.binary(max_size=2000), chunk_size=st.integers(1, 3000))
def test_split_covers_payload_in_equal_chunks_with_a_shorter_last(
    payload: bytes, chunk_size: int
) -> None:
    chunks = list(split_payload(payload, chunk_size))
    assert b"".join(c.data for c in chunks) == payload
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.total == len(chunks) and c.payload_size == len(payload) for c in chunks)
    assert all(c.payload_sha256 == hashlib.sha256(payload).digest() for c in chunks)
    assert all(len(c.data) == chunk_size for c in chunks[:-1])
    assert 0 < len(chunks[-1].data) <= chunk_size or payload == b""


def test_empty_payload_is_one_empty_chunk_and_reassembles() -> None:
    (chunk,) = split_payload(b"", 1024)
    assert (chunk.index, chunk.total, chunk.data, chunk.payload_size) == (0, 1, b"", 0)
    assembler = ChunkAssembler(max_payload_bytes=0)
    assembler.add(chunk)
    assert assembler.result() == b""


def test_single_chunk_payload_is_not_copied() -> None:
    payload = b"x" * 100
    (chunk,) = split_payload(payload, 100)
    assert chunk.data is payload


def test_split_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        list(split_payload(b"abc", 0))
    with pytest.raises(ValueError, match="32 bytes"):
        list(split_payload(b"abc", 1, payload_sha256=b"short"))


PAYLOAD = bytes(range(256)) * 4  # 1024 bytes
CHUNKS = list(split_payload(PAYLOAD, 100))  # 11 chunks, last holds 24 bytes


def _fed(*indices: int, window: int = 0, limit: int = 10_000) -> ChunkAssembler:
    assembler = ChunkAssembler(max_payload_bytes=limit, reorder_window=window)
    for i in indices:
        assembler.add(CHUNKS[i])
    return assembler


def test_result_before_completion_names_the_missing_chunks() -> None:
    with pytest.raises(MissingChunkError, match="no chunk"):
        ChunkAssembler(10_000).result()
    assembler = _fed(0, 1, 3, window=2)
    with pytest.raises(MissingChunkError, match=r"8 of 11 chunks missing \(2, 4, 5"):
        assembler.result()


def test_duplicates_are_rejected_before_and_after_completion() -> None:
    with pytest.raises(DuplicateChunkError, match="chunk 1 of 11 arrived twice"):
        _fed(0, 1, 1)
    with pytest.raises(DuplicateChunkError, match="chunk 3 of 11 arrived twice"):
        _fed(0, 3, 3, window=3)
    done = _fed(*range(11))
    done.result()
    with pytest.raises(DuplicateChunkError):
        done.add(CHUNKS[0])


def test_chunks_beyond_the_reorder_window_are_rejected() -> None:
    with pytest.raises(OutOfOrderChunkError, match="chunk 1 of 11 arrived while chunk 0"):
        _fed(1)
    with pytest.raises(OutOfOrderChunkError, match="window 2 allows at most chunk 3"):
        _fed(0, 4, window=2)
    _fed(0, 3, 2, 1, 4, window=2)  # within the window: fine


def test_declared_size_over_limit_is_rejected_before_any_buffer_exists() -> None:
    huge = ChunkFrame(0, 2, b"x", b"\0" * 32, 10**15)  # a 1 PB buffer would fail loudly
    with pytest.raises(PayloadTooLargeError, match="1000000000000000-byte payload; the limit"):
        ChunkAssembler(max_payload_bytes=10**6).add(huge)
    with pytest.raises(PayloadTooLargeError, match="alone holds 1024 bytes"):
        ChunkAssembler(max_payload_bytes=1000).add(dataclasses.replace(CHUNKS[0], data=PAYLOAD))


def test_rejected_first_chunk_leaves_the_assembler_usable() -> None:
    assembler = ChunkAssembler(max_payload_bytes=10_000)
    with pytest.raises(OutOfOrderChunkError):
        assembler.add(CHUNKS[5])
    for chunk in CHUNKS:
        assembler.add(chunk)
    assert assembler.result() == PAYLOAD


def test_corrupted_data_fails_the_digest_check() -> None:
    assembler = ChunkAssembler(10_000)
    for chunk in CHUNKS:
        if chunk.index == 4:
            flipped = bytes([chunk.data[0] ^ 1]) + chunk.data[1:]
            chunk = dataclasses.replace(chunk, data=flipped)
        assembler.add(chunk)
    assert assembler.complete
    with pytest.raises(DigestMismatchError, match="1024 bytes hashes to sha256"):
        assembler.result()


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"total": 12}, "total is 12, but earlier chunks said 11"),
        ({"payload_size": 1023}, "payload_size is 1023, but earlier chunks said 1024"),
        ({"payload_sha256": b"\1" * 32}, "payload_sha256 is 0101"),
        ({"index": 11}, "outside 0..10"),
        ({"index": -1}, "outside 0..10"),
        ({"data": b"x" * 99}, "holds 99 bytes, expected 100"),
    ],
)
def test_chunks_that_disagree_with_the_stream_are_malformed(
    changes: dict[str, object], fragment: str
) -> None:
    assembler = _fed(0)
    bad = dataclasses.replace(CHUNKS[1], **changes)  # type: ignore[arg-type]
    with pytest.raises(MalformedPayloadError, match=fragment):
        assembler.add(bad)


@pytest.mark.parametrize(
    ("chunk", "fragment"),
    [
        (ChunkFrame(0, 1, b"abc", b"\0" * 31, 3), "32 bytes"),
        (ChunkFrame(0, 5, b"abc", b"\0" * 32, 3), "total 5 chunks is impossible"),
        (ChunkFrame(0, 0, b"", b"\0" * 32, 0), "total 0 chunks is impossible"),
        (ChunkFrame(0, 1, b"ab", b"\0" * 32, 3), "holds 2 bytes, expected 3"),
        (ChunkFrame(0, 3, b"a", b"\0" * 32, 9), "cannot make a 9-byte payload in 3 chunks"),
        (ChunkFrame(0, 1, b"", b"\0" * 32, -1), "payload_size -1"),
    ],
)
def test_first_chunk_inconsistent_with_itself_is_malformed(
    chunk: ChunkFrame, fragment: str
) -> None:
    with pytest.raises(MalformedPayloadError, match=fragment):
        ChunkAssembler(1000).add(chunk)


def test_last_chunk_first_fixes_the_chunk_length() -> None:
    assembler = ChunkAssembler(10_000, reorder_window=10)
    assembler.add(CHUNKS[10])
    with pytest.raises(MalformedPayloadError, match="expected 100"):
        assembler.add(dataclasses.replace(CHUNKS[0], data=CHUNKS[0].data[:50]))
    with pytest.raises(MalformedPayloadError, match="cannot hold the remaining"):
        ChunkAssembler(10_000, reorder_window=10).add(
            dataclasses.replace(CHUNKS[10], data=b"x" * 7)
        )
    for chunk in CHUNKS[:10]:
        assembler.add(chunk)
    assert assembler.result() == PAYLOAD


def test_assembler_rejects_bad_construction_arguments() -> None:
    with pytest.raises(ValueError, match="max_payload_bytes"):
        ChunkAssembler(-1)
    with pytest.raises(ValueError, match="reorder_window"):
        ChunkAssembler(10, reorder_window=-2)


@settings(max_examples=100, deadline=None)
@given(
    pieces=st.lists(st.binary(max_size=300), max_size=6),
    chunk_size=st.integers(1, 400),
)
def test_split_buffers_equals_splitting_the_concatenation(
    pieces: list[bytes], chunk_size: int
) -> None:
    joined = b"".join(pieces)
    as_views = [memoryview(bytearray(p)) for p in pieces]
    assert list(split_buffers(as_views, chunk_size)) == list(split_payload(joined, chunk_size))


@settings(max_examples=30, deadline=None)
@given(tensors=tensor_sets(), metadata=metadata_maps, chunk_size=st.integers(1, 500))
def test_encode_tensor_chunks_streams_the_same_chunks_as_encode_then_split(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, chunk_size: int
) -> None:
    streamed = list(encode_tensor_chunks(tensors, chunk_size, metadata))
    assert streamed == list(split_payload(encode_tensors(tensors, metadata), chunk_size))


def test_writable_result_view_allows_zero_copy_decode() -> None:
    tensors = {"w": torch.randn(64, 32), "n": torch.arange(5)}
    assembler = ChunkAssembler(1 << 20)
    for chunk in encode_tensor_chunks(tensors, 1000):
        assembler.add(chunk)
    with pytest.raises(ValueError, match="writable"):
        decode_tensors(assembler.result_view(), copy=False)
    view = assembler.result_view(writable=True)
    decoded = decode_tensors(view, copy=False)
    assert all(same_bytes(decoded[k], t) for k, t in tensors.items())
    decoded["n"].fill_(7)  # shares the assembler's buffer: the payload bytes change too
    assert decode_tensors(assembler.result())["n"].tolist() == [7] * 5


def test_empty_non_bytes_payload_is_one_empty_chunk() -> None:
    assert [c.data for c in split_payload(bytearray(), 8)] == [b""]
    assert [c.data for c in split_buffers([], 8)] == [b""]


@pytest.mark.parametrize("window", [0, 3])
def test_background_hashing_lane_verifies_like_inline_hashing(
    monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    monkeypatch.setattr(chunking, "BACKGROUND_HASH_MIN_BYTES", 0)  # every payload: pool thread
    payload = bytes(range(256)) * 40
    chunks = list(split_payload(payload, 97))
    order = [1, 0, 3, 2] + list(range(4, len(chunks))) if window else range(len(chunks))
    good = ChunkAssembler(len(payload), reorder_window=window)
    for i in order:
        good.add(chunks[i])
    assert good.result() == payload
    bad = ChunkAssembler(len(payload), reorder_window=window)
    for i in order:
        c = chunks[i]
        bad.add(dataclasses.replace(c, data=c.data[::-1]) if i == 5 else c)
    with pytest.raises(DigestMismatchError):
        bad.result()


def test_large_payload_uses_the_pool_and_round_trips() -> None:
    payload = torch.randint(
        0, 256, (chunking.BACKGROUND_HASH_MIN_BYTES + 12345,), dtype=torch.uint8
    )
    data = payload.numpy().tobytes()
    assembler = ChunkAssembler(len(data))
    for chunk in split_payload(data, 1 << 20):
        assembler.add(chunk)
    assert assembler.result_view() == data


def test_add_into_writes_each_chunk_in_its_place_once_checked() -> None:
    payload = bytes(range(256)) * 10
    digest = hashlib.sha256(payload).digest()
    chunks = list(split_payload(payload, 700))
    assembler = ChunkAssembler(len(payload), reorder_window=2)
    slots: list[int] = []
    for i in (1, 0, 3, 2):
        c = chunks[i]

        def write(dest: memoryview, data: bytes = c.data) -> None:
            slots.append(dest.nbytes)
            dest[:] = data

        assembler.add_into(c.index, c.total, len(c.data), digest, len(payload), write)
    assert slots == [700, 700, len(payload) - 2100, 700]
    assert assembler.result() == payload


def test_a_failing_write_leaves_the_chunk_uncounted() -> None:
    payload = b"x" * 1000
    digest = hashlib.sha256(payload).digest()
    assembler = ChunkAssembler(len(payload))

    def fail(dest: memoryview) -> None:
        raise RuntimeError("decryption failed")

    with pytest.raises(RuntimeError):
        assembler.add_into(0, 2, 500, digest, len(payload), fail)
    assert assembler.received_chunks == 0 and assembler.expected_chunks is None  # still fresh
    assembler.add_into(
        0, 2, 500, digest, len(payload), lambda d: d.__setitem__(slice(None), b"x" * 500)
    )
    with pytest.raises(RuntimeError):
        assembler.add_into(1, 2, 500, digest, len(payload), fail)
    assert assembler.received_chunks == 1 and not assembler.complete
    called: list[int] = []
    with pytest.raises(DuplicateChunkError):  # checks run before the write
        assembler.add_into(0, 2, 500, digest, len(payload), lambda d: called.append(1))
    assert not called


def test_undeclared_digest_only_where_allowed_and_then_computed() -> None:
    payload = bytes(range(200)) * 7
    chunks = [dataclasses.replace(c, payload_sha256=b"") for c in split_payload(payload, 300)]
    strict = ChunkAssembler(len(payload))
    with pytest.raises(MalformedPayloadError, match="payload_sha256 must be 32 bytes"):
        strict.add(chunks[0])
    lenient = ChunkAssembler(len(payload), require_digest=False)
    for c in chunks:
        lenient.add(c)
    assert lenient.result() == payload
    assert lenient.sha256() == hashlib.sha256(payload).digest()
    # a declared digest is still checked, and a stream cannot switch between the two
    declared = list(split_payload(payload, 300))
    mixed = ChunkAssembler(len(payload), require_digest=False)
    mixed.add(declared[0])
    with pytest.raises(MalformedPayloadError, match="payload_sha256"):
        mixed.add(chunks[1])
    wrong = ChunkAssembler(len(payload), require_digest=False)
    for c in declared:
        wrong.add(dataclasses.replace(c, data=c.data[::-1]) if c.index == 1 else c)
    with pytest.raises(DigestMismatchError):
        wrong.sha256()


def test_buffer_pool_reuses_a_buffer_only_when_no_view_of_it_is_left() -> None:
    size = chunking.HUGE_PAGE_BUFFER_MIN_BYTES
    pool = chunking.BufferPool(max_idle=1, idle_s=60.0)
    first = pool.take(size)
    first[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    kept = first[:4].view(torch.int32)  # a live view (like a zero-copy decoded tensor)
    del first
    second = pool.take(size)  # the first buffer is still referenced: a new one
    assert pool.reused == 0
    second.fill_(9)
    assert kept.view(torch.uint8).tolist() == [1, 2, 3, 4]
    del kept
    third = pool.take(size)  # now the first buffer is free again
    assert pool.reused == 1
    del second, third
    pool.take(size + size // 2)  # too far from the idle buffers' size: not reused
    assert pool.reused == 1


def test_buffer_pool_keeps_few_buffers_and_not_for_long() -> None:
    size = chunking.HUGE_PAGE_BUFFER_MIN_BYTES
    pool = chunking.BufferPool(max_idle=1, idle_s=0.2)
    a, b = pool.take(size), pool.take(size)
    del a, b
    assert len(pool._idle) == 1
    deadline = time.monotonic() + 5
    while pool._idle and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pool._idle  # the sweeper dropped it after idle_s
    pool.take(size)
    assert pool.reused == 0


def test_assembler_with_a_pool_round_trips_large_payloads() -> None:
    pool = chunking.BufferPool()
    data = bytes(range(256)) * (chunking.HUGE_PAGE_BUFFER_MIN_BYTES // 256 + 3)
    for _ in range(3):
        assembler = ChunkAssembler(len(data), buffer_pool=pool)
        for chunk in split_payload(data, 1 << 20):
            assembler.add(chunk)
        view = assembler.result_view(writable=True)
        assert view == data
        view[0] ^= 0xFF  # dirty the buffer: the next payload must overwrite it completely
        del view, assembler
    assert pool.reused == 2


def test_lazily_freed_pool_buffers_are_reused_and_rewritten_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client's download pool hands idle buffers back with MADV_FREE: the kernel may
    replace their pages with zeros at any time, so each payload must overwrite every byte."""
    advised: list[int] = []

    class SpyRegion(mmap.mmap):
        def madvise(self, option: int, *args: int) -> None:
            advised.append(option)
            super().madvise(option, *args)

    def region(size: int) -> mmap.mmap:
        return SpyRegion(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    monkeypatch.setattr(chunking, "_new_region", region)
    pool = chunking.BufferPool(max_idle=1, idle_s=60.0, lazy_free=True)
    payloads = [bytes([i]) * (chunking.HUGE_PAGE_BUFFER_MIN_BYTES + 7) for i in (3, 5)]
    for data in payloads:
        assembler = ChunkAssembler(len(data), buffer_pool=pool)
        for chunk in split_payload(data, 1 << 20):
            assembler.add(chunk)
        assert assembler.result_view() == data
        del assembler
    assert pool.reused == 1
    if hasattr(mmap, "MADV_FREE"):
        assert advised.count(mmap.MADV_FREE) == 2  # after each use


def test_receive_payload_reassembles_a_proto_stream_and_names_its_round() -> None:
    payload = bytes(range(256)) * 40
    frames = list(split_payload(payload, 1000, round_id=7))
    assert {f.round for f in frames} == {7} and len(frames) == 11
    got, round_no = receive_payload([f.to_proto() for f in frames], len(payload))
    assert got == payload and round_no == 7
    got, _ = receive_payload(frames, len(payload))  # frames as the zero-copy parser yields them
    assert got == payload


def test_receive_payload_refuses_a_truncated_or_oversized_stream() -> None:
    payload = b"x" * 5000
    frames = list(split_payload(payload, 1000))
    with pytest.raises(MissingChunkError, match="1 of 5 chunks missing"):
        receive_payload(frames[:-1], len(payload))
    with pytest.raises(MissingChunkError):
        receive_payload([], len(payload))
    with pytest.raises(PayloadTooLargeError):
        receive_payload(frames, len(payload) - 1)
