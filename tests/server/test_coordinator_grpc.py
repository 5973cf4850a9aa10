"""Coordinator over real gRPC on 127.0.0.1: health, reflection, an encrypted round end to
end with a hand-checked average, malformed uploads rejected with a clear status and the
model left bit-identical, duplicate uploads, projection exchange."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from crossfed.common.wire.tensor_codec import decode_tensors, encode_tensors
from crossfed.server.round_engine import load_prototypes
from crossfed.server.server_app import CoordinatorServer, ServerOptions
from crossfed.v1 import coordinator_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support.grpc_fixtures import running_server
from tests.support.scripted_client import ScriptedClient


def _wait_train(client: ScriptedClient, timeout: float = 10.0) -> coordinator_pb2.HeartbeatResponse:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        hb = client.heartbeat()
        if hb.action == coordinator_pb2.ACTION_TRAIN:
            return hb
        time.sleep(0.05)
    raise AssertionError(f"{client.client_id} never told to train")


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[CoordinatorServer, str]]:
    with running_server(tmp_path / "state") as pair:
        yield pair


def test_health_and_reflection(server: tuple[CoordinatorServer, str]) -> None:
    _, target = server
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "crossfed.v1.Coordinator"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for a in answers for s in a.list_services_response.service}
        assert "crossfed.v1.Coordinator" in names


def test_encrypted_round_end_to_end_matches_hand_average(
    server: tuple[CoordinatorServer, str],
) -> None:
    srv, target = server
    a = ScriptedClient(target, "alice", num_samples=10)
    b = ScriptedClient(target, "bob", num_samples=30)
    for c in (a, b):
        assert c.register().client_id == c.client_id
    hb = _wait_train(a)
    _wait_train(b)
    assert hb.round == 1 and len(hb.upload_public_key) == 32
    initial = a.download(1)
    assert initial.keys() == srv.engine.global_state.keys()
    for client, delta in ((a, 1.0), (b, 3.0)):
        update = {k: (v + delta if v.is_floating_point() else v + 100) for k, v in initial.items()}
        reply = client.upload(1, update, server_key=hb.upload_public_key)
        assert reply.accepted and not reply.duplicate
    assert srv.engine.wait_idle(30.0)  # the commit runs on the engine's committer thread
    assert srv.engine.run.last_committed_round == 1
    committed = a.download(0)
    for key, value in initial.items():
        if value.is_floating_point():
            # (10 * (g + 1) + 30 * (g + 3)) / 40 = g + 2.5
            assert torch.allclose(committed[key], value + 2.5, atol=1e-5), key
        else:
            assert torch.equal(committed[key], value), key  # integer buffers: global kept
    assert a.download(2).keys() == committed.keys()  # round 2 starts from round 1's model
    a.close(), b.close()


def _bad_updates(initial: dict[str, torch.Tensor]) -> dict[str, tuple[object, grpc.StatusCode]]:
    key = next(k for k, v in initial.items() if v.is_floating_point() and v.dim() == 2)
    wrong_shape = dict(initial)
    wrong_shape[key] = torch.zeros(initial[key].shape[0] + 1, initial[key].shape[1])
    nan = dict(initial)
    nan[key] = initial[key].clone()
    nan[key][0, 0] = float("nan")
    unknown = dict(initial)
    unknown["evil.backdoor"] = torch.zeros(3)
    missing = dict(initial)
    missing.pop(key)
    wrong_dtype = dict(initial)
    wrong_dtype[key] = initial[key].double()
    return {
        "wrong_shape": (wrong_shape, grpc.StatusCode.INVALID_ARGUMENT),
        "nan": (nan, grpc.StatusCode.INVALID_ARGUMENT),
        "unknown_key": (unknown, grpc.StatusCode.INVALID_ARGUMENT),
        "missing_key": (missing, grpc.StatusCode.INVALID_ARGUMENT),
        "wrong_dtype": (wrong_dtype, grpc.StatusCode.INVALID_ARGUMENT),
        "garbage_payload": (b"\x00" * 100_000, grpc.StatusCode.INVALID_ARGUMENT),
    }


def test_malformed_uploads_rejected_and_model_unchanged(
    server: tuple[CoordinatorServer, str],
) -> None:
    srv, target = server
    a = ScriptedClient(target, "alice")
    b = ScriptedClient(target, "bob")
    ghost = ScriptedClient(target, "ghost")
    a.register(), b.register()
    hb = _wait_train(a)
    key = hb.upload_public_key
    initial = a.download(1)
    before_bytes = encode_tensors(srv.engine.global_state)

    def expect(code: grpc.StatusCode, words: str, client: ScriptedClient = a, **kw: object) -> None:
        state = kw.pop("state", initial)
        with pytest.raises(grpc.RpcError) as err:
            client.upload(int(kw.pop("round_no", 1)), state, **kw)  # type: ignore[arg-type]
        assert err.value.code() == code, err.value.details()
        assert words in err.value.details(), err.value.details()

    for name, (state, code) in _bad_updates(initial).items():
        with pytest.raises(grpc.RpcError) as err:
            a.upload(1, state, server_key=key)  # type: ignore[arg-type]
        assert err.value.code() == code, (name, err.value.details())
        assert len(err.value.details()) > 20, name  # a sentence, not a bare code
    expect(grpc.StatusCode.FAILED_PRECONDITION, "round 2", round_no=2, server_key=key)
    expect(grpc.StatusCode.DATA_LOSS, "truncated", server_key=key, drop_last_chunk=True)
    expect(grpc.StatusCode.DATA_LOSS, "sha256", server_key=key, corrupt_digest=True)
    expect(grpc.StatusCode.PERMISSION_DENIED, "unencrypted")
    expect(grpc.StatusCode.NOT_FOUND, "not registered", client=ghost, server_key=key)
    # ciphertext tampered in flight
    msgs = a.upload_messages(1, initial, server_key=key)
    data = bytearray(msgs[1].chunk.data)
    data[5] ^= 0xFF
    msgs[1].chunk.data = bytes(data)
    with pytest.raises(grpc.RpcError) as err:
        a.stub.UploadUpdate(iter(msgs), metadata=a.md, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "authentication failed" in err.value.details()
    # header announcing more module samples than data
    expect(
        grpc.StatusCode.INVALID_ARGUMENT, "exceed", server_key=key, module_samples={"mapper": 99}
    )

    assert encode_tensors(srv.engine.global_state) == before_bytes
    opened = srv.engine.open_round
    assert opened is not None and opened.received == 0
    # after all that, a good upload from the same client is still accepted
    assert a.upload(1, initial, server_key=key).accepted
    rejected = [e for e in srv.engine.store.events_after(0) if e.kind == "upload_rejected"]
    assert len(rejected) >= 10
    for c in (a, b, ghost):
        c.close()


def test_duplicate_upload_id_acknowledged_once(server: tuple[CoordinatorServer, str]) -> None:
    srv, target = server
    a, b = ScriptedClient(target, "alice"), ScriptedClient(target, "bob")
    a.register(), b.register()
    hb = _wait_train(a)
    initial = a.download(1)
    first = a.upload(1, initial, server_key=hb.upload_public_key, upload_id="u-1")
    again = a.upload(1, initial, server_key=hb.upload_public_key, upload_id="u-1")
    assert first.accepted and not first.duplicate
    assert again.accepted and again.duplicate
    opened = srv.engine.open_round
    assert opened is not None and opened.received == 1
    with pytest.raises(grpc.RpcError) as err:
        a.upload(1, initial, server_key=hb.upload_public_key, upload_id="u-2")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert a.heartbeat().action == coordinator_pb2.ACTION_WAIT
    a.close(), b.close()


def test_exact_projection_exchange_publishes_bounded_prototypes_at_commit(
    tmp_path: Path,
) -> None:
    """projection_dp off: exact per-class sums are taken, each row bounded to count x C
    (C = privacy.clip), and published as sums and means at the next commit."""
    exact = {"privacy": {"projection_dp": False}}
    with running_server(tmp_path / "state", sections=exact) as (srv, target):
        a, b = ScriptedClient(target, "alice"), ScriptedClient(target, "bob")
        a.register(), b.register()
        hb = _wait_train(a)
        initial = a.download(1)
        c, dt, di = 3, 16, 8

        def proj(scale: float) -> bytes:  # text rows of norm `scale` x count
            return encode_tensors(
                {
                    "text_sum": torch.full((c, dt), scale / 4),
                    "image_sum": torch.full((c, di), 2.0),
                    "text_count": torch.tensor([1.0, 1.0, 0.0]),
                    "image_count": torch.tensor([2.0, 0.0, 0.0]),
                }
            )

        first = a.exchange(1, proj(1.0), epsilon=0.5)
        assert first.prototypes_round == 0 and not first.global_prototypes.safetensors
        assert first.epsilon_spent == 0.0  # no DP: nothing accounted, the 0.5 is not taken
        with pytest.raises(grpc.RpcError) as err:
            a.exchange(1, encode_tensors({"text_sum": torch.zeros(2, 2)}))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        a.upload(1, initial, server_key=hb.upload_public_key)
        b.upload(1, initial, server_key=hb.upload_public_key)  # commits round 1
        assert srv.engine.wait_idle(30.0)
        late = b.exchange(1, proj(0.5))  # after its upload: accepted, published at next commit
        assert late.prototypes_round == 1
        protos = load_prototypes(bytes(late.global_prototypes.safetensors))
        # alice's rows are inside count x C; her class-2 row has count 0 and is zeroed
        want_text = torch.full((c, dt), 0.25)
        want_text[2] = 0.0
        assert torch.allclose(protos["text_sum"], want_text)
        assert torch.allclose(protos["text_prototype"][2], torch.zeros(dt))  # unseen class
        # the image row of count 2 (norm 5.66) is clipped to 2 x C: mean norm 1
        assert torch.linalg.vector_norm(protos["image_prototype"][0]).item() == pytest.approx(1.0)
        assert srv.engine.run.epsilon_spent == 0.0
        a.close(), b.close()


def test_unencrypted_allowed_only_when_configured(tmp_path: Path) -> None:
    options = ServerOptions(tick_interval_s=0.05, allow_unencrypted_uploads=True)
    with running_server(tmp_path / "s", options, rounds=1, min_clients=1) as (srv, target):
        a = ScriptedClient(target, "alice")
        a.register()
        _wait_train(a)
        initial = a.download(1)
        assert a.upload(1, initial).accepted
        assert srv.engine.wait_idle(30.0)
        assert srv.engine.run.state == "completed"
        assert a.heartbeat().action == coordinator_pb2.ACTION_DONE
        stored = decode_tensors(srv.engine.checkpoints.load_bytes(1))
        assert all(torch.allclose(stored[k], initial[k], rtol=1e-6, atol=0) for k in initial)
        a.close()


def test_the_strategys_asks_travel_with_the_train_heartbeat(tmp_path: Path) -> None:
    """FedProx's mu and FedLC's tau from the strategy section reach the client on the wire."""
    strategy = {"name": "fedavg", "proximal_mu": 0.02, "logit_adjustment": 0.3}
    with running_server(tmp_path / "state", sections={"strategy": strategy}) as (_, target):
        clients = [ScriptedClient(target, cid, num_samples=10) for cid in ("alice", "bob")]
        for c in clients:
            c.register()
        hb = _wait_train(clients[0])
        assert hb.proximal_mu == pytest.approx(0.02)
        assert hb.logit_adjustment == pytest.approx(0.3)
        for c in clients:
            c.close()
