"""Fuzz every Coordinator and Admin RPC of a live server on 127.0.0.1 with hypothesis: random
and edge-case field values, mutated safetensors payloads and chunk streams (plain and
encrypted), and random bytes as the serialized request. Every case must get a proper status
(never UNKNOWN, never a trace or a file path in the details), the server must keep serving,
and the global model (checkpoint bytes) and the state DB tables stay bit-identical (the event
log, last-seen times and rows of clients the fuzzer itself registered excepted).

Default run: a few hundred cases; `-m slow`: >= 10,000."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from crossfed.common.crypto.upload_encryption import UploadEncryptor
from crossfed.common.wire.tensor_codec import encode_tensors
from crossfed.server.server_app import CoordinatorServer, ServerOptions
from crossfed.server.update_validation import spec_of_state
from crossfed.v1 import admin_pb2, common_pb2, coordinator_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.support.reliability.reliability_harness import (
    LightClient,
    checkpoint_digests,
    constant_update,
    dump_db,
    inprocess_server,
    projection_payload,
    record_result,
    upload_value,
    wait_until,
)
from tests.support.reliability.rpc_fuzzing import (
    ADMIN,
    ADMIN_METHODS,
    COORDINATOR,
    COORDINATOR_METHODS,
    FuzzTally,
    RawCaller,
    blobs,
    digest_of,
    doubles,
    ids,
    mutated_payload,
    small_round,
    texts,
    u32,
    u64,
    would_be_accepted,
)

ORIGINAL_CLIENTS = ("fz-sel", "fz-up", "fz-other")
FAST = {"unary": 120, "upload": 120, "raw": 60, "admin": 100}
SLOW = {"unary": 3000, "upload": 3500, "raw": 1500, "admin": 2500}


def _settings(n: int) -> Any:
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )


@dataclass
class FuzzTarget:
    """A live server with round 1 open: fz-up has uploaded (and sent projections), fz-sel and
    fz-other are selected and pending, so the round never closes while fuzzed."""

    server: CoordinatorServer
    target: str
    state_dir: Path
    channel: grpc.Channel
    caller: RawCaller
    tally: FuzzTally
    template: dict[str, torch.Tensor]
    valid_update: bytes
    server_key: bytes
    before: tuple[Any, ...]

    def snapshot(self) -> tuple[Any, ...]:
        db = dump_db(
            self.state_dir / "state.db",
            drop={"events": ("*",), "sqlite_sequence": ("*",), "clients": ("last_seen_unix_s",)},
        )
        db["clients"] = [r for r in db["clients"] if r[0] in ORIGINAL_CLIENTS]
        model = {k: v.clone() for k, v in self.server.engine.global_state.items()}
        return checkpoint_digests(self.state_dir), db, model

    def assert_unchanged(self) -> None:
        digests, db, model = self.snapshot()
        assert digests == self.before[0], "checkpoint files changed"
        for table in db:
            assert db[table] == self.before[1][table], f"state DB table {table!r} changed"
        assert model.keys() == self.before[2].keys()
        for key, value in model.items():
            assert torch.equal(value, self.before[2][key]), f"global model {key} changed"
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

    def assert_round_intact(self) -> None:
        engine = self.server.engine
        opened = engine.open_round
        assert opened is not None and opened.round == 1 and opened.received == 1, opened
        assert engine.run.last_committed_round == 0


@contextmanager
def fuzz_target(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FuzzTarget]:
    options = ServerOptions(
        tick_interval_s=0.05,
        heartbeat_interval_ms=100,
        auto_start=False,
        allow_unencrypted_uploads=True,
        client_timeout_s=3600.0,
    )
    with inprocess_server(
        state_dir, monkeypatch, options, rounds=3, min_clients=3, round_deadline_s=3600.0
    ) as (server, target):
        clients = [LightClient(target, cid, index=i) for i, cid in enumerate(ORIGINAL_CLIENTS)]
        for client in clients:
            client.register()
        server.engine.start()
        for client in clients:
            client.wait_action(coordinator_pb2.ACTION_TRAIN)
        assert clients[1].train_and_upload(1).accepted
        wait_until(lambda: server.engine.open_round is not None, 5, "round 1 open")
        template = clients[0].download(1)
        valid = encode_tensors(constant_update(template, upload_value(0, 1)))
        key = clients[0].heartbeat().upload_public_key
        tally = FuzzTally()
        channel = grpc.insecure_channel(target)
        fz = FuzzTarget(
            server,
            target,
            state_dir,
            channel,
            RawCaller(channel, tally),
            tally,
            template,
            valid,
            key,
            (),
        )
        fz.before = fz.snapshot()
        try:
            yield fz
        finally:
            channel.close()
            for client in clients:
                client.close()


def _md(cid: str | None) -> tuple[tuple[str, str], ...]:
    return (("x-crossfed-client-id", cid),) if cid else ()


any_identity = st.one_of(st.none(), st.sampled_from(ORIGINAL_CLIENTS), ids)
projection_keys = ["text_sum", "image_sum", "text_count", "image_count"]


@st.composite
def projection_request(draw: st.DrawFn) -> bytes:
    valid = projection_payload(draw(st.integers(0, 5)), scale=draw(st.sampled_from([1.0, 1e30])))
    payload = draw(st.one_of(st.just(b""), blobs, mutated_payload(valid)))
    digest = draw(st.one_of(st.just(digest_of(payload)), st.binary(max_size=40)))
    return coordinator_pb2.ProjectionExchangeRequest(
        round=draw(small_round),
        projections=common_pb2.TensorPayload(safetensors=payload, payload_sha256=digest),
        epsilon_spent=draw(doubles),
    ).SerializeToString()


def _unary_case(fz: FuzzTarget, data: st.DataObject) -> None:
    rpc = data.draw(st.sampled_from(["Register", "Heartbeat", "Enroll", "Exchange", "Download"]))
    if rpc == "Register":
        mostly_zero = st.one_of(st.just(0), st.just(0), u64)
        request = coordinator_pb2.RegisterRequest(
            modality=data.draw(st.one_of(st.integers(1, 3), st.integers(0, 6))),  # type: ignore[arg-type]
            num_samples=data.draw(u64),
            num_paired=data.draw(mostly_zero),
            num_text_only=data.draw(mostly_zero),
            num_image_only=data.draw(mostly_zero),
            model_config_digest=data.draw(texts),
            daemon_version=data.draw(texts),
        )
        # re-registering an original client may legitimately change its row: fresh ids only
        who = data.draw(st.one_of(st.none(), ids.map(lambda s: "rnd-" + s)))
        fz.caller.unary(COORDINATOR + "Register", request.SerializeToString(), _md(who))
    elif rpc == "Heartbeat":
        request_hb = coordinator_pb2.HeartbeatRequest(last_completed_round=data.draw(u64))
        fz.caller.unary(
            COORDINATOR + "Heartbeat", request_hb.SerializeToString(), _md(data.draw(any_identity))
        )
    elif rpc == "Enroll":
        request_en = coordinator_pb2.EnrollRequest(
            enrollment_token=data.draw(texts), requested_client_id=data.draw(texts)
        )
        fz.caller.unary(COORDINATOR + "Enroll", request_en.SerializeToString())
    elif rpc == "Exchange":
        who = data.draw(st.one_of(st.none(), st.just("fz-up"), ids))
        fz.caller.unary(
            COORDINATOR + "ExchangeProjections", data.draw(projection_request()), _md(who)
        )
    else:
        request_dl = coordinator_pb2.DownloadRequest(
            round=data.draw(small_round), start_chunk=data.draw(u32)
        )
        fz.caller.server_stream(
            COORDINATOR + "DownloadGlobalModel",
            request_dl.SerializeToString(),
            _md(data.draw(any_identity)),
        )
    fz.assert_round_intact()


@st.composite
def upload_case(draw: st.DrawFn, fz: FuzzTarget) -> tuple[list[bytes], str | None]:
    """A header + chunk stream from a mutated payload, itself mutated at the message level."""
    spec = spec_of_state(fz.template)
    payload = draw(mutated_payload(fz.valid_update))
    assume(not would_be_accepted(payload, spec))
    who = draw(st.one_of(st.sampled_from(["fz-sel"] * 6 + ["fz-up", "fz-other"]), st.none(), ids))
    round_no = draw(st.one_of(st.just(1), small_round))
    size = draw(st.sampled_from([256, 1024, 5000]))
    parts = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
    total = len(parts)
    encrypted = draw(st.booleans())
    client_key = b""
    if encrypted and who and 0 < round_no < 2**64 and total <= 2**20:
        enc = UploadEncryptor(fz.server_key, who, round_no)
        client_key = enc.client_public_key
        parts = [enc.encrypt_chunk(i, total, p) for i, p in enumerate(parts)]
    elif encrypted:
        client_key = draw(st.binary(max_size=40))
    digest = digest_of(payload)
    header = coordinator_pb2.UploadHeader(
        round=round_no,
        client_public_key=draw(st.one_of(st.just(client_key), st.binary(max_size=40))),
        num_samples=draw(st.one_of(st.just(3), u64)),
        module_samples=draw(
            st.dictionaries(
                st.one_of(st.sampled_from(["fusion", "head", "mapper", "nope"]), texts),
                u64,
                max_size=3,
            )
        ),
        metrics=common_pb2.Metrics(values=draw(st.dictionaries(texts, doubles, max_size=3))),
        payload_size=draw(st.one_of(st.just(len(payload)), u64)),
        payload_sha256=draw(st.one_of(st.just(digest), st.binary(max_size=40))),
        total_chunks=draw(st.one_of(st.just(total), u32)),
        encrypted=encrypted,
        upload_id=draw(st.one_of(st.just("u-" + str(draw(st.integers(0, 3)))), texts)),
    )
    chunks = [
        common_pb2.TensorChunk(
            index=i,
            total=total,
            data=p,
            payload_sha256=digest,
            payload_size=len(payload),
            round=round_no,
        )
        for i, p in enumerate(parts)
    ]
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "dup", "swap", "field", "data"]))
        if not chunks:
            break
        i = draw(st.integers(0, len(chunks) - 1))
        if op == "drop":
            chunks.pop(i)
        elif op == "dup":
            chunks.insert(i, chunks[i])
        elif op == "swap":
            j = draw(st.integers(0, len(chunks) - 1))
            chunks[i], chunks[j] = chunks[j], chunks[i]
        elif op == "field":
            c = common_pb2.TensorChunk()
            c.CopyFrom(chunks[i])
            name = draw(st.sampled_from(["index", "total", "payload_size", "round"]))
            setattr(c, name, draw(u64 if name in ("payload_size", "round") else u32))
            chunks[i] = c
        else:
            c = common_pb2.TensorChunk()
            c.CopyFrom(chunks[i])
            c.data = draw(blobs)
            chunks[i] = c
    messages = [coordinator_pb2.UploadMessage(header=header).SerializeToString()]
    messages += [coordinator_pb2.UploadMessage(chunk=c).SerializeToString() for c in chunks]
    extra = draw(st.sampled_from(["none", "none", "header", "garbage", "no_header", "empty"]))
    if extra == "header":
        messages.insert(draw(st.integers(1, len(messages))), messages[0])
    elif extra == "garbage":
        messages.insert(draw(st.integers(0, len(messages))), draw(blobs))
    elif extra == "no_header":
        messages = messages[1:]
    elif extra == "empty":
        messages = []
    return messages, who


def _run_coordinator_fuzz(fz: FuzzTarget, n_unary: int, n_upload: int) -> None:
    @_settings(n_unary)
    @given(st.data())
    def unary(data: st.DataObject) -> None:
        _unary_case(fz, data)

    @_settings(n_upload)
    @given(st.data())
    def upload(data: st.DataObject) -> None:
        messages, who = data.draw(upload_case(fz))
        fz.caller.client_stream(COORDINATOR + "UploadUpdate", messages, _md(who))
        fz.assert_round_intact()

    unary()
    upload()
    fz.assert_unchanged()


# raw bytes would reach state-changing admin calls as valid messages (an empty message is a
# valid StopRun): only the read-only and refused-in-insecure-mode ones get raw bytes here
_RAW_ADMIN_SAFE = {"GetStatus", "ListClients", "ListRounds", "ExportModel", "CreateEnrollmentToken"}


def _run_raw_fuzz(fz: FuzzTarget, n: int) -> None:
    methods = [(COORDINATOR + m, k) for m, k in COORDINATOR_METHODS if m != "Register"]
    methods += [(ADMIN + m, k) for m, k in ADMIN_METHODS if m in _RAW_ADMIN_SAFE]

    @_settings(n)
    @given(st.sampled_from(methods), st.lists(blobs, max_size=4), any_identity)
    def raw(method: tuple[str, str], payloads: list[bytes], who: str | None) -> None:
        name, kind = method
        first = payloads[0] if payloads else b""
        if kind == "unary":
            fz.caller.unary(name, first, _md(who))
        elif kind == "server_stream":
            fz.caller.server_stream(name, first, _md(who))
        else:
            fz.caller.client_stream(name, payloads, _md(who))
        fz.assert_round_intact()

    raw()
    fz.assert_unchanged()


def test_fuzz_coordinator_rpcs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A few hundred fuzzed Coordinator calls (unary, upload streams, raw bytes)."""
    started = time.monotonic()
    with fuzz_target(tmp_path / "state", monkeypatch) as fz:
        _run_coordinator_fuzz(fz, FAST["unary"], FAST["upload"])
        _run_raw_fuzz(fz, FAST["raw"])
        tally = fz.tally
    record_result(
        "fuzz_coordinator_fast",
        cases=tally.total,
        per_rpc=dict(tally.cases),
        statuses=dict(tally.statuses),
        seconds=round(time.monotonic() - started, 1),
        improper=0,
    )


@pytest.mark.slow
def test_fuzz_coordinator_rpcs_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The long run: thousands of cases per Coordinator RPC family."""
    started = time.monotonic()
    with fuzz_target(tmp_path / "state", monkeypatch) as fz:
        _run_coordinator_fuzz(fz, SLOW["unary"], SLOW["upload"])
        _run_raw_fuzz(fz, SLOW["raw"])
        tally = fz.tally
    record_result(
        "fuzz_coordinator_long",
        cases=tally.total,
        per_rpc=dict(tally.cases),
        statuses=dict(tally.statuses),
        seconds=round(time.monotonic() - started, 1),
        improper=0,
    )


# --------------------------------------------------------------------------- Admin


live_keys = st.sampled_from(
    [
        "rounds.rounds",
        "rounds.min_clients",
        "rounds.fraction",
        "rounds.round_deadline_s",
        "rounds.straggler_cutoff",
        "rounds.max_retries_on_failed_round",
        "privacy.epsilon_budget",
        "listen",
        "model.text_dim",
    ]
)
config_values = st.one_of(
    texts,
    st.sampled_from(
        [
            "0",
            "-1",
            "1",
            "2",
            "3",
            "1e400",
            "nan",
            "inf",
            "none",
            "99999999999999999999",
            "18446744073709551616",
            "0.5",
            "true",
            "",
        ]
    ),
    u64.map(str),
)


def _admin_request(data: st.DataObject) -> tuple[str, str, bytes]:
    rpc = data.draw(st.sampled_from([m for m, _ in ADMIN_METHODS]))
    kind = dict(ADMIN_METHODS)[rpc]
    msg: Any
    if rpc == "ListRounds":
        msg = admin_pb2.ListRoundsRequest(limit=data.draw(u32))
    elif rpc == "StartRun":
        msg = admin_pb2.StartRunRequest(
            rounds=data.draw(u64),
            min_clients=data.draw(u32),
            fraction=data.draw(doubles),
            round_deadline_s=data.draw(doubles),
        )
    elif rpc in ("PauseRun", "ResumeRun", "StopRun"):
        msg = admin_pb2.RunControlRequest(reason=data.draw(texts))
    elif rpc == "UpdateConfig":
        msg = admin_pb2.UpdateConfigRequest(
            values=data.draw(
                st.dictionaries(st.one_of(live_keys, texts), config_values, max_size=3)
            )
        )
    elif rpc == "ExportModel":
        msg = admin_pb2.ExportModelRequest(round=data.draw(small_round))
    elif rpc == "RemoveClient":
        msg = admin_pb2.RemoveClientRequest(client_id=data.draw(st.one_of(texts, ids)))
    elif rpc == "CreateEnrollmentToken":
        msg = admin_pb2.CreateEnrollmentTokenRequest(
            ttl_s=data.draw(doubles), client_id=data.draw(texts)
        )
    elif rpc == "StreamEvents":
        msg = admin_pb2.StreamEventsRequest(after_event_id=data.draw(u64), follow=False)
    elif rpc == "GetStatus":
        msg = admin_pb2.GetStatusRequest()
    else:
        msg = admin_pb2.ListClientsRequest()
    return ADMIN + rpc, kind, msg.SerializeToString()


def _run_admin_fuzz(fz: FuzzTarget, n: int) -> None:
    """Admin calls may legitimately pause/stop the run or change policy; they must never
    touch the model or the committed history, and always answer properly."""

    @_settings(n)
    @given(st.data())
    def admin(data: st.DataObject) -> None:
        name, kind, request = _admin_request(data)
        if kind == "unary":
            fz.caller.unary(name, request)
        else:
            fz.caller.server_stream(name, request)
        assert fz.server.engine.run.last_committed_round == 0

    admin()
    assert checkpoint_digests(fz.state_dir) == fz.before[0], "admin fuzz changed a checkpoint"
    for key, value in fz.server.engine.global_state.items():
        assert torch.equal(value, fz.before[2][key])
    # the engine's in-memory run agrees with the DB after whatever was applied
    db_run = dump_db(fz.state_dir / "state.db")["run"][0]
    run = fz.server.engine.run
    assert (db_run[2], db_run[3], db_run[4]) == (
        run.state,
        run.total_rounds,
        run.last_committed_round,
    )


def test_fuzz_admin_rpcs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fuzzed Admin calls (loopback, insecure mode: served)."""
    started = time.monotonic()
    with fuzz_target(tmp_path / "state", monkeypatch) as fz:
        _run_admin_fuzz(fz, FAST["admin"])
        tally = fz.tally
    record_result(
        "fuzz_admin_fast",
        cases=tally.total,
        per_rpc=dict(tally.cases),
        statuses=dict(tally.statuses),
        seconds=round(time.monotonic() - started, 1),
        improper=0,
    )


@pytest.mark.slow
def test_fuzz_admin_rpcs_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The long Admin run."""
    started = time.monotonic()
    with fuzz_target(tmp_path / "state", monkeypatch) as fz:
        _run_admin_fuzz(fz, SLOW["admin"])
        tally = fz.tally
    record_result(
        "fuzz_admin_long",
        cases=tally.total,
        per_rpc=dict(tally.cases),
        statuses=dict(tally.statuses),
        seconds=round(time.monotonic() - started, 1),
        improper=0,
    )
