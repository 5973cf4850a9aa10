"""tensor_codec: safetensors round trips, interop with the reference library, hostile input."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import safetensors.torch
import torch
from crossfed.common.wire.errors import MalformedPayloadError, TensorValidationError, WireError
from crossfed.common.wire.tensor_codec import (
    decode_metadata,
    decode_tensors,
    encode_tensors,
    encode_tensors_with_digest,
    payload_pieces,
    read_header,
    supported_dtypes,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.wire_strategies import metadata_maps, same_bytes, tensor_sets


def _payload(header: object, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@settings(max_examples=60, deadline=None)
@given(tensors=tensor_sets(), metadata=metadata_maps)
def test_round_trip_preserves_every_tensor_bit_for_bit(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
) -> None:
    payload = encode_tensors(tensors, metadata)
    decoded = decode_tensors(payload)
    assert decoded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert same_bytes(decoded[name], tensor), name
    assert decode_metadata(payload) == (metadata or {})


@settings(max_examples=25, deadline=None)
@given(tensors=tensor_sets(), metadata=metadata_maps)
def test_reference_safetensors_reads_our_bytes_and_we_read_theirs(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
) -> None:
    ours = encode_tensors(tensors, metadata)
    theirs_view = safetensors.torch.load(ours)
    assert all(same_bytes(theirs_view[k], t) for k, t in tensors.items())
    # safetensors refuses empty metadata maps only in some versions; give it None then.
    theirs = safetensors.torch.save(tensors, metadata=metadata or None)
    assert all(same_bytes(decode_tensors(theirs)[k], t) for k, t in tensors.items())


def test_every_supported_dtype_round_trips_including_float8_and_wide_unsigned() -> None:
    tensors = {str(dtype): torch.zeros(2, 3, dtype=dtype) for dtype in supported_dtypes()}
    for i, t in enumerate(tensors.values()):
        if t.dtype != torch.bool:
            t.view(torch.uint8).fill_(i + 1)
    decoded = decode_tensors(encode_tensors(tensors))
    assert all(same_bytes(decoded[k], t) for k, t in tensors.items())


def test_decoded_tensors_own_their_memory_and_inputs_need_not_be_contiguous() -> None:
    source = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # non-contiguous
    payload = bytearray(encode_tensors({"w": source, "b": torch.ones(2)}))
    decoded = decode_tensors(payload)
    payload[:] = b"\0" * len(payload)  # mutating the buffer must not reach the tensors
    assert torch.equal(decoded["w"], source)
    decoded["b"].add_(1)  # and they are writable
    assert decoded["w"].untyped_storage().data_ptr() != decoded["b"].untyped_storage().data_ptr()


def test_tensors_are_laid_out_aligned_and_header_padded_to_eight_bytes() -> None:
    payload = encode_tensors(
        {"a": torch.ones(3, dtype=torch.int8), "b": torch.ones(2, dtype=torch.float64)}
    )
    header = read_header(payload)
    assert header.data_start % 8 == 0
    for entry in header.entries:
        assert entry.begin % torch.empty((), dtype=entry.dtype).element_size() == 0


def test_encode_with_digest_matches_hashlib_small_and_large() -> None:
    small = {"x": torch.ones(10)}
    large = {"x": torch.randn(2_000_000), "y": torch.ones(7, dtype=torch.int8)}  # > 4 MiB
    for tensors in (small, large):
        encoded = encode_tensors_with_digest(tensors, {"k": "v"})
        assert encoded.data == encode_tensors(tensors, {"k": "v"})
        assert encoded.sha256 == hashlib.sha256(encoded.data).digest()


@pytest.mark.parametrize(
    ("tensors", "metadata", "fragment"),
    [
        ({"x": [1.0]}, None, "expected a torch.Tensor"),
        ({"": torch.ones(1)}, None, "non-empty"),
        ({"__metadata__": torch.ones(1)}, None, "reserved"),
        ({"c": torch.ones(2, dtype=torch.complex64)}, None, "not supported"),
        ({"s": torch.eye(2).to_sparse()}, None, "layout"),
        ({"x": torch.ones(1)}, {"k": 1}, "metadata 'k'"),
    ],
)
def test_encode_rejects_what_cannot_travel(
    tensors: dict[str, object], metadata: dict[str, object] | None, fragment: str
) -> None:
    with pytest.raises(TensorValidationError, match=fragment):
        encode_tensors(tensors, metadata)  # type: ignore[arg-type]


VALID = encode_tensors(
    {"w": torch.randn(4, 4), "m": torch.tensor([True, False, True])}, {"round": "1"}
)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"", "8-byte header length"),
        (b"abc", "8-byte header length"),
        (struct.pack("<Q", 2**63) + b"{}", "limit"),  # header bomb: never allocated
        (struct.pack("<Q", 1000) + b"{}", "only 2 bytes follow"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "UTF-8 JSON"),
        (struct.pack("<Q", 5) + b"{nope", "UTF-8 JSON"),
        (_payload([1, 2]), "JSON object"),
        (struct.pack("<Q", 20000) + b"[" * 10000 + b"]" * 10000, "UTF-8 JSON"),
        (_payload({"x": {"dtype": "F32", "shape": [1]}}), "exactly keys"),
        (
            _payload({"x": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "unsupported dtype",
        ),
        (
            _payload({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "non-negative",
        ),
        (
            _payload({"x": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),
            "non-negative",
        ),
        (
            _payload({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
            "needs 8 bytes",
        ),
        (
            _payload({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4),
            "begin <= end",
        ),
        (
            _payload({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 2),
            "truncated",
        ),
        (
            _payload({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9),
            "trailing",
        ),
        (_payload({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "gap"),
        (
            _payload(
                {
                    "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "y": {"dtype": "I16", "shape": [2], "data_offsets": [2, 6]},
                },
                b"\0" * 6,
            ),
            "overlaps",
        ),
        (
            _payload({"x": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02"),
            "other than 0 and 1",
        ),
        (_payload({"__metadata__": {"a": 1}}), "strings to strings"),
        (
            _payload({"x": {"dtype": "U8", "shape": [0, 2**61, 2**61], "data_offsets": [0, 0]}}),
            "cannot allocate",
        ),
    ],
)
def test_decode_rejects_malformed_payloads_with_a_clear_message(
    payload: bytes, fragment: str
) -> None:
    with pytest.raises(MalformedPayloadError, match=fragment):
        decode_tensors(payload)


def test_duplicate_tensor_names_are_rejected() -> None:
    raw = (
        b'{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
        b'"x":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
    )
    with pytest.raises(MalformedPayloadError, match="'x' twice"):
        decode_tensors(struct.pack("<Q", len(raw)) + raw + b"\0\0")


def test_every_truncation_of_a_valid_payload_is_rejected() -> None:
    for cut in range(len(VALID)):
        with pytest.raises(MalformedPayloadError):
            decode_tensors(VALID[:cut])


def test_header_limit_is_configurable() -> None:
    with pytest.raises(MalformedPayloadError, match="limit is 16 bytes"):
        decode_metadata(VALID, max_header_bytes=16)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_never_escape_as_anything_but_malformed(data: bytes) -> None:
    try:
        decode_tensors(data)
    except MalformedPayloadError:
        pass


@settings(max_examples=200, deadline=None)
@given(position=st.integers(0, len(VALID) - 1), value=st.integers(0, 255))
def test_single_byte_corruption_decodes_or_raises_malformed(position: int, value: int) -> None:
    corrupted = bytearray(VALID)
    corrupted[position] = value
    try:
        decode_tensors(bytes(corrupted))
    except MalformedPayloadError:
        pass


def test_errors_are_value_errors() -> None:
    assert issubclass(MalformedPayloadError, WireError)
    assert issubclass(WireError, ValueError)


def test_zero_copy_decode_shares_the_buffer_and_checks_like_the_copying_one() -> None:
    tensors = {"w": torch.randn(8, 8), "h": torch.ones(3, dtype=torch.float16)}
    buffer = bytearray(encode_tensors(tensors))
    decoded = decode_tensors(buffer, copy=False)
    assert all(same_bytes(decoded[k], t) for k, t in tensors.items())
    decoded["w"].zero_()
    assert not any(decode_tensors(bytes(buffer))["w"].flatten().tolist())
    with pytest.raises(ValueError, match="writable"):
        decode_tensors(bytes(buffer), copy=False)
    bad_bool = bytearray(
        _payload({"x": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x05")
    )
    with pytest.raises(MalformedPayloadError, match="other than 0 and 1"):
        decode_tensors(bad_bool, copy=False)


def test_zero_copy_decode_copies_misaligned_tensors_from_foreign_writers() -> None:
    header = {
        "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},  # misaligned by 1
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = bytearray(struct.pack("<Q", len(raw)) + raw + b"\x07" + struct.pack("<2f", 1.5, -2.0))
    decoded = decode_tensors(data, copy=False)
    assert decoded["b"].tolist() == [1.5, -2.0] and decoded["a"].tolist() == [7]


def test_payload_pieces_concatenate_to_the_payload() -> None:
    tensors = {"w": torch.randn(3, 3), "i": torch.arange(4, dtype=torch.int16)}
    assert b"".join(payload_pieces(tensors, {"a": "b"})) == encode_tensors(tensors, {"a": "b"})
