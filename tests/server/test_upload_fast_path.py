"""The zero-copy upload/download path through the real server: the client daemon's transport
end to end, and frame-level attacks (reordered, replayed, cross-round, cross-client, tampered,
truncated chunks) still rejected before anything touches the model."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from crossfed.client.call_identity import identity_metadata
from crossfed.client.model_download import DownloadProgress
from crossfed.client.transport import ChannelOptions, ChannelSecurity, GrpcTransport
from crossfed.client.update_upload import (
    LocalUpdate,
    PreparedUpload,
    default_encryptor_factory,
    prepare_upload,
)
from crossfed.common.crypto.upload_encryption import UploadEncryptor
from crossfed.common.wire.chunk_stream import (
    ChunkFrame,
    upload_chunk_prefix,
    upload_message_from_wire,
)
from crossfed.common.wire.tensor_codec import decode_tensors, encode_tensors
from crossfed.server.server_app import CoordinatorServer
from crossfed.server.upload_receiver import AEAD_TAGS_PREFIX
from crossfed.v1 import coordinator_pb2

from tests.support.grpc_fixtures import running_server

CHUNK = 4096


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[CoordinatorServer, str]]:
    with running_server(tmp_path / "state") as pair:
        yield pair


def _transport(target: str, client_id: str) -> GrpcTransport:
    transport = GrpcTransport.connect(
        target,
        ChannelSecurity(insecure=True),
        client_id=client_id,
        options=ChannelOptions(max_message_bytes=1024 * 1024),
    )
    transport.register(coordinator_pb2.RegisterRequest(modality=1, num_samples=10))  # type: ignore[arg-type]
    return transport


def _train(transport: GrpcTransport) -> coordinator_pb2.HeartbeatResponse:
    end = time.monotonic() + 10
    while time.monotonic() < end:
        beat = transport.heartbeat(coordinator_pb2.HeartbeatRequest())
        if beat.action == coordinator_pb2.ACTION_TRAIN:
            return beat
        time.sleep(0.05)
    raise AssertionError("never told to train")


def _download(transport: GrpcTransport, round_id: int) -> memoryview:
    progress = DownloadProgress(round_id)
    for chunk in transport.download(coordinator_pb2.DownloadRequest(round=round_id)):
        assert isinstance(chunk, ChunkFrame)  # the zero-copy framing, not protobuf objects
        progress.add(chunk)
    return progress.payload()


def test_daemon_transport_round_trip_records_the_payload_digest(
    server: tuple[CoordinatorServer, str],
) -> None:
    srv, target = server
    alice, bob = _transport(target, "alice"), _transport(target, "bob")
    beat = _train(alice)
    round_id = int(beat.round)
    _, path = srv.engine.downloads.model_file(round_id)
    model = _download(alice, round_id)
    assert model.readonly and model == path.read_bytes()
    update = encode_tensors(decode_tensors(model))
    prepared = prepare_upload(
        LocalUpdate(update, 10),
        round_id,
        "alice",
        "u-alice",
        CHUNK,
        bytes(beat.upload_public_key),
        default_encryptor_factory(),
    )
    assert prepared.encrypted and not prepared.payload_sha256  # no client-side hash
    frames = _frames(prepared)  # one attempt's frames (a new attempt draws a new key)
    channel = grpc.insecure_channel(target)
    send_raw = channel.stream_unary(
        "/crossfed.v1.Coordinator/UploadUpdate",
        request_serializer=lambda frame: frame,
        response_deserializer=coordinator_pb2.UploadResponse.FromString,
    )
    reply = send_raw(iter(frames), metadata=identity_metadata("alice"), timeout=30)
    assert reply.accepted and not reply.duplicate
    opened = srv.engine.open_round
    assert opened is not None
    (record,) = srv.engine.store.list_uploads(round_id, opened.attempt)
    # the server did not hash the plaintext: the record holds the digest of the AES-GCM tags
    tags = b"".join(bytes(_chunk(f).data)[-16:] for f in frames[1:])
    assert record.payload_sha256 == AEAD_TAGS_PREFIX + hashlib.sha256(tags).hexdigest()
    # and the daemon's own transport path is accepted end to end
    reply = bob.upload(
        prepare_upload(
            LocalUpdate(update, 10),
            round_id,
            "bob",
            "u-bob",
            CHUNK,
            bytes(beat.upload_public_key),
            default_encryptor_factory(),
        ).messages
    )
    assert reply.accepted and not reply.duplicate
    channel.close(), alice.close(), bob.close()


def _frames(prepared: PreparedUpload) -> list[bytes]:
    return list(prepared.messages.wire_frames())


def _chunk(frame: bytes) -> ChunkFrame:
    parsed = upload_message_from_wire(frame)
    assert isinstance(parsed, ChunkFrame)
    return parsed


def _reframe(chunk: ChunkFrame, data: bytes | None = None) -> bytes:
    body = bytes(chunk.data) if data is None else data
    prefix = upload_chunk_prefix(
        chunk.index, chunk.total, len(body), chunk.payload_sha256, chunk.payload_size, chunk.round
    )
    return prefix + body


def test_frame_level_attacks_are_rejected_and_the_model_is_untouched(
    server: tuple[CoordinatorServer, str],
) -> None:
    srv, target = server
    alice, bob = _transport(target, "alice"), _transport(target, "bob")
    beat = _train(alice)
    round_id, key = int(beat.round), bytes(beat.upload_public_key)
    update = encode_tensors(decode_tensors(_download(alice, round_id)))
    before = encode_tensors(srv.engine.global_state)
    channel = grpc.insecure_channel(target)
    send_raw = channel.stream_unary(
        "/crossfed.v1.Coordinator/UploadUpdate",
        request_serializer=lambda frame: frame,
        response_deserializer=coordinator_pb2.UploadResponse.FromString,
    )

    def prepared(
        client: str = "alice", factory: Callable[..., UploadEncryptor] | None = None, **kw: object
    ) -> PreparedUpload:
        return prepare_upload(
            LocalUpdate(update, 10, **kw),  # type: ignore[arg-type]
            round_id,
            client,
            f"u-{time.monotonic_ns()}",
            CHUNK,
            key,
            factory or default_encryptor_factory(),
        )

    def expect(frames: list[bytes], code: grpc.StatusCode, words: str) -> None:
        with pytest.raises(grpc.RpcError) as err:
            send_raw(iter(frames), metadata=identity_metadata("alice"), timeout=30)
        assert err.value.code() == code, err.value.details()
        assert words in err.value.details(), err.value.details()

    good = _frames(prepared())
    c0, c1 = _chunk(good[1]), _chunk(good[2])
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    # chunk 1's ciphertext presented as chunk 0 (and vice versa): index bound as AAD
    expect(
        [good[0], _reframe(c0, bytes(c1.data)), _reframe(c1, bytes(c0.data)), *good[3:]],
        invalid,
        "authentication failed",
    )
    expect([good[0], good[1], good[1], *good[2:]], invalid, "duplicate chunk index")  # replay
    tampered = bytearray(c1.data)
    tampered[7] ^= 0x40
    expect(
        [good[0], good[1], _reframe(c1, bytes(tampered)), *good[3:]],
        invalid,
        "authentication failed",
    )
    # a chunk cut short: rejected as unauthentic, not merely as a malformed stream
    expect(
        [good[0], good[1], _reframe(c1, bytes(c1.data)[:-1]), *good[3:]],
        invalid,
        "authentication failed",
    )

    def round_2(server_key: bytes, client: str, _round: int) -> UploadEncryptor:
        return UploadEncryptor(server_key, client, round_id + 1)

    expect(_frames(prepared(factory=round_2)), invalid, "authentication failed")  # cross-round
    expect(_frames(prepared(client="bob")), invalid, "authentication failed")  # cross-client
    wrong_digest = hashlib.sha256(b"not the update").digest()
    expect(_frames(prepared(payload_sha256=wrong_digest)), grpc.StatusCode.DATA_LOSS, "sha256")
    clear = prepare_upload(LocalUpdate(update, 10), round_id, "alice", "u-clear", CHUNK, b"", None)
    header = coordinator_pb2.UploadMessage.FromString(_frames(clear)[0])
    header.header.payload_sha256 = b""  # only an encrypted upload may leave the digest out
    expect([header.SerializeToString(), *_frames(clear)[1:]], invalid, "must be 32 bytes")

    assert encode_tensors(srv.engine.global_state) == before
    opened = srv.engine.open_round
    assert opened is not None and opened.received == 0
    assert alice.upload(prepared().messages).accepted  # the genuine update still goes through
    channel.close(), alice.close(), bob.close()
