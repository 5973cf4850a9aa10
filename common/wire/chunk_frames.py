"""Zero-copy protobuf framing of the bulk messages: ``TensorChunk`` and ``UploadMessage{chunk}``.

protobuf's Python runtime copies a ``bytes`` field three times on the way through (into the
message, into the serialized string, out again on parse and on attribute access); at ~1 MiB
chunks those copies cost more than the transfer itself. Here the sender builds the few bytes
of framing before the data field and appends the data once, and the receiver reads the
framing by hand and keeps ``data`` as a view of the received buffer.

The encoding is ordinary protobuf (fields 1, 2, 4, 5, 6 first, field 3 ``data`` last: field
order is free on the wire), so every protobuf parser reads it. The fast parser accepts the
usual shapes only; anything else (groups, over-long varints, a header, merged repeats of the
chunk field) goes to protobuf's own parser, so its semantics and errors are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from crossfed.v1 import common_pb2, coordinator_pb2

__all__ = [
    "ChunkFrame",
    "chunk_frame_from_wire",
    "parse_chunk_frame",
    "tensor_chunk_prefix",
    "upload_chunk_prefix",
    "upload_message_from_wire",
    "wire_bytes",
]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_TAG_INDEX, _TAG_TOTAL, _TAG_DATA = 0x08, 0x10, 0x1A
_TAG_SHA, _TAG_SIZE, _TAG_ROUND = 0x22, 0x28, 0x30
_TAG_UPLOAD_CHUNK = 0x12  # UploadMessage.chunk = 2, length-delimited


@dataclass(frozen=True, slots=True)
class ChunkFrame:
    """The fields of one ``TensorChunk``; ``data`` may be a view into the received message."""

    index: int
    total: int
    data: bytes | memoryview
    payload_sha256: bytes
    payload_size: int
    round: int

    @classmethod
    def from_proto(cls, chunk: common_pb2.TensorChunk) -> ChunkFrame:
        """The same fields read from a parsed protobuf message (one copy of ``data``)."""
        return cls(
            int(chunk.index),
            int(chunk.total),
            bytes(chunk.data),
            bytes(chunk.payload_sha256),
            int(chunk.payload_size),
            int(chunk.round),
        )

    def to_proto(self) -> common_pb2.TensorChunk:
        """A protobuf ``TensorChunk`` with the same fields (copies ``data``)."""
        return common_pb2.TensorChunk(
            index=self.index,
            total=self.total,
            data=bytes(self.data),
            payload_sha256=self.payload_sha256,
            payload_size=self.payload_size,
            round=self.round,
        )


# --------------------------------------------------------------------------- encoding


def _varint(value: int) -> bytes:
    if value < 0:
        raise ValueError(f"protobuf varints here are unsigned, got {value}")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tensor_chunk_prefix(
    index: int,
    total: int,
    data_len: int,
    payload_sha256: bytes,
    payload_size: int,
    round_id: int,
) -> bytes:
    """Serialized ``TensorChunk`` up to its data: ``prefix + data`` is the whole message."""
    if not (0 <= index <= _U32 and 0 <= total <= _U32):
        raise ValueError(f"index/total must fit uint32, got {index}/{total}")
    if not (0 <= payload_size <= _U64 and 0 <= round_id <= _U64):
        raise ValueError(f"payload_size/round must fit uint64, got {payload_size}/{round_id}")
    out = bytearray()
    # proto3: zero/empty scalars are omitted, exactly as protobuf's serializer does
    for tag, value in ((_TAG_INDEX, index), (_TAG_TOTAL, total)):
        if value:
            out += bytes((tag,)) + _varint(value)
    if payload_sha256:
        out += bytes((_TAG_SHA,)) + _varint(len(payload_sha256)) + payload_sha256
    for tag, value in ((_TAG_SIZE, payload_size), (_TAG_ROUND, round_id)):
        if value:
            out += bytes((tag,)) + _varint(value)
    if data_len:
        out += bytes((_TAG_DATA,)) + _varint(data_len)
    return bytes(out)


def upload_chunk_prefix(
    index: int,
    total: int,
    data_len: int,
    payload_sha256: bytes,
    payload_size: int,
    round_id: int,
) -> bytes:
    """Serialized ``UploadMessage(chunk=TensorChunk(...))`` up to the chunk's data."""
    inner = tensor_chunk_prefix(index, total, data_len, payload_sha256, payload_size, round_id)
    return bytes((_TAG_UPLOAD_CHUNK,)) + _varint(len(inner) + data_len) + inner


def wire_bytes(message: object) -> bytes:
    """gRPC serializer for the bulk streams: pre-framed ``bytes`` pass through unchanged,
    protobuf messages are serialized as usual."""
    if isinstance(message, bytes):
        return message
    serialize = getattr(message, "SerializeToString", None)
    if serialize is None:
        raise TypeError(f"cannot put a {type(message).__name__} on the wire")
    data: bytes = serialize()
    return data


# --------------------------------------------------------------------------- decoding


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int] | None:
    """(value, next position), or None for a varint this parser leaves to protobuf."""
    value = shift = 0
    for i in range(pos, min(end, pos + 10)):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if i == pos + 9 and byte > 1:  # more than 64 bits
                return None
            return value, i + 1
        shift += 7
    return None  # truncated or longer than 10 bytes


def parse_chunk_frame(buf: memoryview, start: int = 0, end: int | None = None) -> ChunkFrame | None:
    """Parse a serialized ``TensorChunk`` in ``buf[start:end]`` without copying ``data``.

    None when the bytes use something the fast path leaves to protobuf (groups, malformed or
    over-long varints, truncation); fields read like protobuf does: last occurrence wins,
    uint32 fields keep the low 32 bits, unknown fields and mistyped known fields are skipped.
    """
    end = len(buf) if end is None else end
    index = total = payload_size = round_id = 0
    data: memoryview = buf[start:start]
    digest: memoryview = data
    pos = start
    while pos < end:
        got = _read_varint(buf, pos, end)
        if got is None:
            return None
        tag, pos = got
        field, kind = tag >> 3, tag & 7
        if field == 0 or tag > _U32:  # field numbers are 1 .. 2**29 - 1
            return None
        if kind == _VARINT:
            got = _read_varint(buf, pos, end)
            if got is None:
                return None
            value, pos = got
            if field == 1:
                index = value & _U32
            elif field == 2:
                total = value & _U32
            elif field == 5:
                payload_size = value
            elif field == 6:
                round_id = value
        elif kind == _LEN:
            got = _read_varint(buf, pos, end)
            if got is None or got[0] > end - got[1]:
                return None
            length, pos = got
            if field == 3:
                data = buf[pos : pos + length]
            elif field == 4:
                digest = buf[pos : pos + length]
            pos += length
        elif kind in (_I64, _I32):
            pos += 8 if kind == _I64 else 4
            if pos > end:
                return None
        else:  # groups (3, 4) and invalid wire types 6, 7
            return None
    return ChunkFrame(index, total, data, digest.tobytes(), payload_size, round_id)


def chunk_frame_from_wire(data: bytes) -> ChunkFrame:
    """gRPC deserializer for a ``TensorChunk`` stream; ``data`` of the frame is a view."""
    frame = parse_chunk_frame(memoryview(data))
    if frame is None:
        return ChunkFrame.from_proto(common_pb2.TensorChunk.FromString(data))
    return frame


def upload_message_from_wire(data: bytes) -> coordinator_pb2.UploadMessage | ChunkFrame:
    """gRPC deserializer for UploadUpdate: a chunk as a zero-copy ``ChunkFrame``; the header
    (and any unusual encoding) as the protobuf ``UploadMessage``."""
    view = memoryview(data)
    if len(view) and view[0] == _TAG_UPLOAD_CHUNK:
        got = _read_varint(view, 1, len(view))
        if got is not None and got[1] + got[0] == len(view):  # the chunk field is all there is
            frame = parse_chunk_frame(view, got[1])
            if frame is not None:
                return frame
    return coordinator_pb2.UploadMessage.FromString(data)
