"""chunk_stream framing: hand-built framing is ordinary protobuf, the fast parser reads exactly what
protobuf reads (or hands the bytes to protobuf), and chunk data stays a view."""

from __future__ import annotations

import pytest
from crossfed.common.wire.chunk_stream import (
    ChunkFrame,
    chunk_frame_from_wire,
    parse_chunk_frame,
    tensor_chunk_prefix,
    upload_chunk_prefix,
    upload_message_from_wire,
    wire_bytes,
)
from crossfed.v1 import common_pb2, coordinator_pb2
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)


def _fields(chunk: common_pb2.TensorChunk) -> tuple[object, ...]:
    return (
        chunk.index,
        chunk.total,
        bytes(chunk.data),
        bytes(chunk.payload_sha256),
        chunk.payload_size,
        chunk.round,
    )


def _frame_fields(frame: ChunkFrame) -> tuple[object, ...]:
    return (
        frame.index,
        frame.total,
        bytes(frame.data),
        frame.payload_sha256,
        frame.payload_size,
        frame.round,
    )


@settings(max_examples=200, deadline=None)
@given(U32, U32, st.binary(max_size=300), st.binary(max_size=40), U64, U64)
def test_prefix_plus_data_is_the_protobuf_message(
    index: int, total: int, data: bytes, digest: bytes, size: int, round_id: int
) -> None:
    frame = tensor_chunk_prefix(index, total, len(data), digest, size, round_id) + data
    expected = common_pb2.TensorChunk(
        index=index,
        total=total,
        data=data,
        payload_sha256=digest,
        payload_size=size,
        round=round_id,
    )
    assert _fields(common_pb2.TensorChunk.FromString(frame)) == _fields(expected)
    assert _frame_fields(chunk_frame_from_wire(frame)) == _fields(expected)
    upload = upload_chunk_prefix(index, total, len(data), digest, size, round_id) + data
    parsed = coordinator_pb2.UploadMessage.FromString(upload)
    assert parsed.WhichOneof("kind") == "chunk"
    assert _fields(parsed.chunk) == _fields(expected)
    fast = upload_message_from_wire(upload)
    assert isinstance(fast, ChunkFrame) and _frame_fields(fast) == _fields(expected)


def test_data_is_a_view_into_the_received_message() -> None:
    data = bytes(range(256)) * 64
    message = upload_chunk_prefix(3, 9, len(data), b"d" * 32, 10_000, 2) + data
    frame = upload_message_from_wire(message)
    assert isinstance(frame, ChunkFrame)
    assert isinstance(frame.data, memoryview) and frame.data.obj is message
    assert frame.data == data


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120))
def test_fast_parser_agrees_with_protobuf_on_arbitrary_bytes(blob: bytes) -> None:
    """Fuzz: wherever protobuf parses, the result is the same; wherever it fails, so do we."""
    try:
        expected = common_pb2.TensorChunk.FromString(blob)
    except DecodeError:
        with pytest.raises(DecodeError):
            chunk_frame_from_wire(blob)
    else:
        assert _frame_fields(chunk_frame_from_wire(blob)) == _fields(expected)
    try:
        upload = coordinator_pb2.UploadMessage.FromString(blob)
    except DecodeError:
        with pytest.raises(DecodeError):
            upload_message_from_wire(blob)
    else:
        got = upload_message_from_wire(blob)
        if isinstance(got, ChunkFrame):
            assert upload.WhichOneof("kind") == "chunk"
            assert _frame_fields(got) == _fields(upload.chunk)
        else:
            assert got == upload


def test_protobuf_quirks_read_like_protobuf() -> None:
    chunk = common_pb2.TensorChunk(index=1, total=2, data=b"first", payload_size=7)
    # a repeated field (last wins), an unknown varint and length-delimited field, a known
    # field with the wrong wire type (kept as unknown by protobuf), a 64-bit value in uint32
    extra = b"\x08\x05" + b"\x98\x06\x01" + b"\xa2\x06\x03abc" + b"\x2a\x01z" + b"\x1a\x04last"
    extra += b"\x10" + b"\xff\xff\xff\xff\x1f"  # total = 2**35 - 1 -> low 32 bits
    blob = chunk.SerializeToString() + extra
    assert parse_chunk_frame(memoryview(blob)) is not None  # handled on the fast path
    assert _frame_fields(chunk_frame_from_wire(blob)) == _fields(
        common_pb2.TensorChunk.FromString(blob)
    )


@pytest.mark.parametrize(
    "blob",
    [
        b"\x0b\x0c",  # a (deprecated) group: left to protobuf
        b"\x08" + b"\xff" * 11,  # over-long varint
        b"\x1a\x05abc",  # truncated data
        b"\x00\x01",  # field number 0
    ],
)
def test_unusual_encodings_go_to_protobuf(blob: bytes) -> None:
    assert parse_chunk_frame(memoryview(blob)) is None
    try:
        expected = common_pb2.TensorChunk.FromString(blob)
    except DecodeError:
        with pytest.raises(DecodeError):
            chunk_frame_from_wire(blob)
    else:
        assert _frame_fields(chunk_frame_from_wire(blob)) == _fields(expected)


def test_upload_header_and_merged_chunks_keep_protobuf_semantics() -> None:
    header = coordinator_pb2.UploadMessage(
        header=coordinator_pb2.UploadHeader(round=4, upload_id="u", total_chunks=2)
    ).SerializeToString()
    assert upload_message_from_wire(header) == coordinator_pb2.UploadMessage.FromString(header)
    one = coordinator_pb2.UploadMessage(chunk=common_pb2.TensorChunk(index=1, data=b"a"))
    two = coordinator_pb2.UploadMessage(chunk=common_pb2.TensorChunk(total=5))
    merged = one.SerializeToString() + two.SerializeToString()  # protobuf merges submessages
    got = upload_message_from_wire(merged)
    assert not isinstance(got, ChunkFrame)
    assert (got.chunk.index, got.chunk.total, got.chunk.data) == (1, 5, b"a")


def test_wire_bytes_passes_frames_and_serializes_messages() -> None:
    message = coordinator_pb2.UploadMessage(header=coordinator_pb2.UploadHeader(round=1))
    assert wire_bytes(b"framed") == b"framed"
    assert wire_bytes(message) == message.SerializeToString()
    with pytest.raises(TypeError):
        wire_bytes(object())


def test_prefix_rejects_values_that_do_not_fit() -> None:
    with pytest.raises(ValueError):
        tensor_chunk_prefix(2**32, 1, 0, b"", 0, 0)
    with pytest.raises(ValueError):
        tensor_chunk_prefix(0, 1, 0, b"", 2**64, 0)


def test_frame_converts_to_and_from_protobuf() -> None:
    chunk = common_pb2.TensorChunk(
        index=2, total=3, data=b"xyz", payload_sha256=b"h" * 32, payload_size=9, round=7
    )
    frame = ChunkFrame.from_proto(chunk)
    assert _frame_fields(frame) == _fields(chunk)
    assert frame.to_proto() == chunk


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@st.composite
def field_soups(draw: st.DrawFn) -> bytes:
    """Well-formed protobuf records of random fields 1..8 and wire types, in random order."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 8))):
        number, kind = draw(st.integers(1, 8)), draw(st.sampled_from([0, 1, 2, 5]))
        out += _varint(number << 3 | kind)
        if kind == 0:
            out += _varint(draw(st.integers(0, 2**64 - 1)))
        elif kind == 2:
            value = draw(st.binary(max_size=40))
            out += _varint(len(value)) + value
        else:
            out += draw(st.binary(min_size=8 if kind == 1 else 4, max_size=8 if kind == 1 else 4))
    return bytes(out)


@settings(max_examples=400, deadline=None)
@given(field_soups())
def test_fast_parser_agrees_with_protobuf_on_field_soups(blob: bytes) -> None:
    expected = common_pb2.TensorChunk.FromString(blob)
    assert parse_chunk_frame(memoryview(blob)) is not None
    assert _frame_fields(chunk_frame_from_wire(blob)) == _fields(expected)
    upload = _varint(2 << 3 | 2) + _varint(len(blob)) + blob
    got = upload_message_from_wire(upload)
    assert isinstance(got, ChunkFrame)
    assert _frame_fields(got) == _fields(coordinator_pb2.UploadMessage.FromString(upload).chunk)


@settings(max_examples=400, deadline=None)
@given(
    U32,
    U32,
    st.binary(max_size=60),
    U64,
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(0, 3),
)
def test_fast_parser_agrees_with_protobuf_on_damaged_messages(
    index: int,
    total: int,
    data: bytes,
    size: int,
    edits: list[tuple[int, int]],
    cut: int,
) -> None:
    blob = bytearray(tensor_chunk_prefix(index, total, len(data), b"s" * 32, size, 5) + data)
    for position, value in edits:
        blob[position % len(blob)] = value
    damaged = bytes(blob[: len(blob) - cut])
    for parse, reference in (
        (chunk_frame_from_wire, common_pb2.TensorChunk.FromString),
        (upload_message_from_wire, coordinator_pb2.UploadMessage.FromString),
    ):
        try:
            expected = reference(damaged)
        except DecodeError:
            with pytest.raises(DecodeError):
                parse(damaged)
            continue
        got = parse(damaged)
        if isinstance(got, ChunkFrame):
            chunk = expected if isinstance(expected, common_pb2.TensorChunk) else expected.chunk
            assert _frame_fields(got) == _fields(chunk)
        else:
            assert got == expected
