"""Hypothesis strategies and a raw-bytes gRPC caller for fuzzing every Coordinator and Admin
RPC: random field values at the extremes (uint64 max, NaN, inf, huge/unicode strings),
mutated safetensors payloads and chunk streams, and plain random bytes as the serialized
request. `check_reply` is the per-case verdict: a proper status, never UNKNOWN (an uncaught
exception), never a trace or a file path in the details."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from crossfed.common.wire.errors import WireError
from crossfed.common.wire.tensor_codec import decode_tensors, encode_tensors
from crossfed.server.errors import InvalidUpdateError
from crossfed.server.update_validation import TensorSlot, validate_update
from hypothesis import strategies as st

COORDINATOR = "/crossfed.v1.Coordinator/"
ADMIN = "/crossfed.v1.Admin/"

#: Every RPC of the two services and its kind (what the fuzzers call).
COORDINATOR_METHODS = [
    ("Enroll", "unary"),
    ("Register", "unary"),
    ("Heartbeat", "unary"),
    ("DownloadGlobalModel", "server_stream"),
    ("UploadUpdate", "client_stream"),
    ("ExchangeProjections", "unary"),
]
ADMIN_METHODS = [
    ("GetStatus", "unary"),
    ("ListClients", "unary"),
    ("ListRounds", "unary"),
    ("StartRun", "unary"),
    ("PauseRun", "unary"),
    ("ResumeRun", "unary"),
    ("StopRun", "unary"),
    ("UpdateConfig", "unary"),
    ("ExportModel", "server_stream"),
    ("RemoveClient", "unary"),
    ("CreateEnrollmentToken", "unary"),
    ("StreamEvents", "server_stream"),
]

#: Status codes a fuzzed request may get. UNKNOWN means an exception escaped a servicer.
PROPER_CODES = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.DATA_LOSS,
        # gRPC's own answer to bytes that do not parse as the request message
        # ("Exception deserializing request!"): fixed text, no trace; checked below
        grpc.StatusCode.INTERNAL,
    }
)
_LEAK = re.compile(r"Traceback|File \"|\.py\b|site-packages|/work/|/tmp/|/home/|/usr/lib")
_INTERNAL_OK = ("Exception deserializing request!", "Exception iterating requests!")

U64_EDGES = [0, 1, 2, 3, 7, 2**31 - 1, 2**32 - 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1]
u64 = st.one_of(st.sampled_from(U64_EDGES), st.integers(0, 2**64 - 1))
u32 = st.one_of(st.sampled_from([0, 1, 2, 3, 2**31 - 1, 2**32 - 1]), st.integers(0, 2**32 - 1))
small_round = st.one_of(st.integers(0, 4), u64)
doubles = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e308, -1e308, 5e-324]),
    st.floats(allow_nan=True, allow_infinity=True),
)
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\x00", "💥" * 10, "a" * 5000]))
blobs = st.binary(max_size=1500)
ids = st.from_regex(r"[a-z0-9_-]{1,24}", fullmatch=True)


@dataclass
class FuzzTally:
    """Cases sent and statuses seen, per RPC (for RELIABILITY.md)."""

    cases: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)

    def add(self, rpc: str, code: grpc.StatusCode) -> None:
        self.cases[rpc] += 1
        self.statuses[code.name] += 1

    @property
    def total(self) -> int:
        return sum(self.cases.values())


class LeakError(AssertionError):
    """The server answered a fuzzed request improperly (UNKNOWN, trace or path leaked)."""


def check_reply(rpc: str, code: grpc.StatusCode, details: str) -> None:
    """Raise `LeakError` unless (code, details) is a proper, non-leaking answer."""
    if code not in PROPER_CODES:
        raise LeakError(f"{rpc}: improper status {code.name}: {details[:500]!r}")
    if code == grpc.StatusCode.INTERNAL and details not in _INTERNAL_OK:
        raise LeakError(f"{rpc}: INTERNAL from the servicer: {details[:500]!r}")
    if _LEAK.search(details or ""):
        raise LeakError(f"{rpc}: details leak a trace or a path: {details[:500]!r}")


class RawCaller:
    """Send already-serialized requests (bytes) to any method; return (code, details)."""

    def __init__(self, channel: grpc.Channel, tally: FuzzTally) -> None:
        self.channel = channel
        self.tally = tally

    def _finish(self, rpc: str, call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
        try:
            call()
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            details = exc.details() or ""  # type: ignore[attr-defined]
        self.tally.add(rpc, code)
        check_reply(rpc, code, details)
        return code, details

    def unary(
        self, method: str, request: bytes, metadata: Sequence[tuple[str, str]] = ()
    ) -> tuple[grpc.StatusCode, str]:
        stub = self.channel.unary_unary(method)
        return self._finish(method, lambda: stub(request, metadata=tuple(metadata), timeout=10))

    def server_stream(
        self, method: str, request: bytes, metadata: Sequence[tuple[str, str]] = ()
    ) -> tuple[grpc.StatusCode, str]:
        stub = self.channel.unary_stream(method)
        return self._finish(
            method, lambda: list(stub(request, metadata=tuple(metadata), timeout=10))
        )

    def client_stream(
        self, method: str, requests: Sequence[bytes], metadata: Sequence[tuple[str, str]] = ()
    ) -> tuple[grpc.StatusCode, str]:
        stub = self.channel.stream_unary(method)
        return self._finish(
            method, lambda: stub(iter(list(requests)), metadata=tuple(metadata), timeout=10)
        )


# --------------------------------------------------------------------------- payloads


def would_be_accepted(payload: bytes, spec: dict[str, TensorSlot]) -> bool:
    """Oracle: does ``payload`` decode to a complete, finite update for ``spec``? (Such a
    payload may legitimately be accepted; the fuzzer only sends invalid ones to a live slot.)"""
    try:
        validate_update(decode_tensors(payload), spec)
    except (WireError, InvalidUpdateError):
        return False
    return True


def _header_len(payload: bytes) -> int:
    return int(struct.unpack("<Q", payload[:8])[0]) if len(payload) >= 8 else 0


@st.composite
def mutated_payload(draw: st.DrawFn, valid: bytes) -> bytes:
    """A safetensors payload broken in one of many ways (starting from a valid one)."""
    kind = draw(
        st.sampled_from(
            ["random", "truncate", "extend", "header_len", "header_flip", "json", "tensors"]
        )
    )
    if kind == "random":
        return draw(st.binary(max_size=4096))
    if kind == "truncate":
        return valid[: draw(st.integers(0, max(0, len(valid) - 1)))]
    if kind == "extend":
        return valid + draw(st.binary(min_size=1, max_size=64))
    if kind == "header_len":
        value = draw(st.one_of(st.sampled_from([0, 1, 7, 2**63, 2**64 - 1]), u64))
        return struct.pack("<Q", value) + valid[8:]
    hlen = _header_len(valid)
    if kind == "header_flip":
        pos = draw(st.integers(0, 8 + hlen - 1))
        byte = draw(st.integers(0, 255))
        return valid[:pos] + bytes([byte]) + valid[pos + 1 :]
    header = json.loads(valid[8 : 8 + hlen])
    if kind == "json":
        key = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        entry: dict[str, Any] | None = dict(header[key])
        which = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra", "drop"]))
        assert entry is not None
        if which == "dtype":
            entry["dtype"] = draw(st.sampled_from(["F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3",
                                                   "X9", "", "F64"]))  # fmt: skip
        elif which == "shape":
            entry["shape"] = draw(st.lists(st.integers(-2, 2**40), max_size=4))
        elif which == "data_offsets":
            entry["data_offsets"] = draw(st.lists(st.integers(-5, 2**62), max_size=3))
        elif which == "extra":
            entry[draw(st.text(max_size=8))] = draw(st.integers())
        else:
            header.pop(key)
            entry = None
        if entry is not None:
            header[key] = entry
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + valid[8 + hlen :]
    # "tensors": well-formed safetensors with the wrong contents
    tensors = decode_tensors(valid)
    key = draw(st.sampled_from(sorted(tensors)))
    how = draw(st.sampled_from(["nan", "inf", "drop", "extra", "shape", "dtype"]))
    if how == "nan":
        tensors[key] = torch.full_like(tensors[key].float(), float("nan"))
    elif how == "inf":
        tensors[key] = torch.full_like(tensors[key].float(), float("inf"))
    elif how == "drop":
        tensors.pop(key)
    elif how == "extra":
        tensors[key + ".extra"] = torch.zeros(3)
    elif how == "shape":
        tensors[key] = torch.zeros(tensors[key].numel() + 1)
    else:
        tensors[key] = tensors[key].to(torch.float64)
    return encode_tensors(tensors)


def digest_of(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()
