"""ClientLoop state machine against a fake transport and a fake worker (no network): retries,
download resume, idempotent upload retry, re-registration, rejection and DONE."""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pytest
from crossfed.client.backoff import Backoff, RetryPolicy
from crossfed.client.errors import (
    FatalServerError,
    NotRegisteredError,
    RoundAbandonedError,
    ServerUnreachableError,
    TransientTransportError,
)
from crossfed.client.loop import (
    ClientLoop,
    LoopSettings,
    ProjectionUpload,
    Registered,
    Registration,
    RoundReport,
)
from crossfed.client.update_upload import LocalUpdate
from crossfed.common.round_instructions import PLAIN, RoundInstructions
from crossfed.v1 import common_pb2, coordinator_pb2

CHUNK = 4


def _model_payload(round_id: int) -> bytes:
    return (f"global-model-of-round-{round_id}-" * 3).encode()


@dataclass
class FakeServer:
    """A scripted coordinator that keeps just enough state to judge the client."""

    rounds: list[int] = field(default_factory=lambda: [1, 2])
    key: bytes = b""
    heartbeat_script: list[object] = field(default_factory=list)  # responses or exceptions
    download_faults: list[int | None] = field(default_factory=list)  # chunks before failing
    corrupt_downloads: int = 0
    upload_faults: list[str] = field(default_factory=list)  # "mid" | "ack-lost" | "reject"
    exchange_faults: int = 0
    client_id_seen: list[str] = field(default_factory=list)
    registered: int = 0
    counted: dict[tuple[int, str], bytes] = field(default_factory=dict)
    upload_headers: list[coordinator_pb2.UploadHeader] = field(default_factory=list)
    exchanges: list[int] = field(default_factory=list)
    decrypt: object = None
    calibration_round: int | None = None  # answered with ACTION_CALIBRATE
    proximal_mu: float = 0.0  # sent with every TRAIN action (the strategy's FedProx mu)
    logit_adjustment: float = 0.0  # and FedLC's tau

    def current_round(self) -> int | None:
        done = {r for r, _ in self.counted}
        pending = [r for r in self.rounds if r not in done]
        return pending[0] if pending else None


class FakeTransport:
    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.client_id = ""

    def set_client_id(self, client_id: str) -> None:
        self.client_id = client_id

    def enroll(self, request: coordinator_pb2.EnrollRequest) -> coordinator_pb2.EnrollResponse:
        raise NotImplementedError

    def register(
        self, request: coordinator_pb2.RegisterRequest
    ) -> coordinator_pb2.RegisterResponse:
        assert request.num_samples == 10
        self.server.registered += 1
        return coordinator_pb2.RegisterResponse(
            client_id="c-7", run_id="run-1", chunk_size=CHUNK, heartbeat_interval_ms=50
        )

    def heartbeat(
        self, request: coordinator_pb2.HeartbeatRequest
    ) -> coordinator_pb2.HeartbeatResponse:
        self.server.client_id_seen.append(self.client_id)
        if self.server.heartbeat_script:
            item = self.server.heartbeat_script.pop(0)
            if isinstance(item, Exception):
                raise item
            assert isinstance(item, coordinator_pb2.HeartbeatResponse)
            return item
        current = self.server.current_round()
        if current is None:
            return coordinator_pb2.HeartbeatResponse(action=coordinator_pb2.ACTION_DONE)
        action = (
            coordinator_pb2.ACTION_CALIBRATE
            if current == self.server.calibration_round
            else coordinator_pb2.ACTION_TRAIN
        )
        return coordinator_pb2.HeartbeatResponse(
            action=action,
            round=current,
            upload_public_key=self.server.key,
            proximal_mu=self.server.proximal_mu,
            logit_adjustment=self.server.logit_adjustment,
        )

    def download(
        self, request: coordinator_pb2.DownloadRequest
    ) -> Iterator[common_pb2.TensorChunk]:
        payload = _model_payload(int(request.round))
        parts = [payload[i : i + CHUNK] for i in range(0, len(payload), CHUNK)]
        digest = hashlib.sha256(payload).digest()
        fail_after = self.server.download_faults.pop(0) if self.server.download_faults else None
        corrupt = self.server.corrupt_downloads > 0
        if corrupt:
            self.server.corrupt_downloads -= 1
        for sent, index in enumerate(range(request.start_chunk, len(parts))):
            if fail_after is not None and sent == fail_after:
                raise TransientTransportError("UNAVAILABLE: connection reset (fake)")
            data = b"X" * len(parts[index]) if corrupt and index == len(parts) - 1 else parts[index]
            yield common_pb2.TensorChunk(
                index=index,
                total=len(parts),
                data=data,
                payload_sha256=digest,
                payload_size=len(payload),
                round=request.round,
            )

    def upload(
        self, messages: Iterable[coordinator_pb2.UploadMessage]
    ) -> coordinator_pb2.UploadResponse:
        it = iter(messages)
        header = next(it).header
        self.server.upload_headers.append(header)
        fault = self.server.upload_faults.pop(0) if self.server.upload_faults else None
        chunks = []
        for message in it:
            chunks.append(message.chunk)
            if fault == "mid" and len(chunks) == 1:
                raise TransientTransportError("UNAVAILABLE: server went away (fake)")
        if fault == "reject":
            return coordinator_pb2.UploadResponse(accepted=False, message="deadline passed")
        key = (int(header.round), header.upload_id)
        if any(r == header.round for r, _ in self.server.counted):
            return coordinator_pb2.UploadResponse(accepted=True, duplicate=True)
        data = [bytes(c.data) for c in chunks]
        if header.encrypted and header.client_public_key != b"eph-" + self.server.key:
            return coordinator_pb2.UploadResponse(accepted=False, message="cannot decrypt")
        if header.encrypted:
            assert callable(self.server.decrypt)
            data = [self.server.decrypt(header, c.index, c.total, d) for c, d in zip(chunks, data)]
        payload = b"".join(data)
        # an encrypted upload may leave the digest out (every chunk is AEAD-authenticated)
        if header.payload_sha256 or not header.encrypted:
            assert hashlib.sha256(payload).digest() == header.payload_sha256
        self.server.counted[key] = payload
        if fault == "ack-lost":
            raise TransientTransportError("DEADLINE_EXCEEDED (fake, after counting)")
        return coordinator_pb2.UploadResponse(accepted=True)

    def exchange_projections(
        self, request: coordinator_pb2.ProjectionExchangeRequest
    ) -> coordinator_pb2.ProjectionExchangeResponse:
        if self.server.exchange_faults:
            self.server.exchange_faults -= 1
            raise TransientTransportError("UNAVAILABLE (fake)")
        self.server.exchanges.append(int(request.round))
        protos = b"prototypes-after-" + str(request.round).encode()
        return coordinator_pb2.ProjectionExchangeResponse(
            global_prototypes=common_pb2.TensorPayload(
                safetensors=protos, payload_sha256=hashlib.sha256(protos).digest()
            ),
            prototypes_round=request.round,
        )

    def close(self) -> None:
        pass


@dataclass
class FakeWorker:
    loaded: dict[int, bytes] = field(default_factory=dict)
    trained: list[int] = field(default_factory=list)
    prototypes_at_train: list[bytes | None] = field(default_factory=list)
    prototypes: bytes | None = None
    projection_calls: int = 0
    registered: list[Registered] = field(default_factory=list)
    calibrated: list[int] = field(default_factory=list)
    instructions: list[RoundInstructions] = field(default_factory=list)

    def registration(self) -> Registration:
        return Registration(
            modality=common_pb2.MODALITY_CONFIG_BOTH,
            num_samples=10,
            num_paired=4,
            num_text_only=3,
            num_image_only=3,
        )

    def on_registered(self, registered: Registered) -> None:
        self.registered.append(registered)

    def load_global(self, round_id: int, payload: bytes | memoryview) -> None:
        self.loaded[round_id] = bytes(payload)

    def train(
        self,
        round_id: int,
        local_epochs: int | None,
        instructions: RoundInstructions = PLAIN,
    ) -> LocalUpdate:
        self.trained.append(round_id)
        self.instructions.append(instructions)
        self.prototypes_at_train.append(self.prototypes)
        return LocalUpdate(
            payload=b"update-" + self.loaded[round_id][::-1],
            num_samples=10,
            module_samples={"mapper": 4},
            metrics={"loss": 1.0 / (1 + len(self.trained))},
        )

    def calibration_stats(self, round_id: int) -> LocalUpdate:
        self.calibrated.append(round_id)
        return LocalUpdate(payload=b"stats-" + self.loaded[round_id], num_samples=7)

    def projections(self, round_id: int) -> ProjectionUpload | None:
        self.projection_calls += 1
        return ProjectionUpload(payload=f"proj-{round_id}".encode(), epsilon_spent=0.5)

    def receive_prototypes(self, round_id: int, payload: bytes) -> None:
        self.prototypes = payload


@dataclass
class FakeClock:
    now: float = 0.0
    sleeps: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _loop(
    server: FakeServer,
    worker: FakeWorker | None = None,
    policy: RetryPolicy | None = None,
    **kwargs: object,
) -> tuple[ClientLoop, FakeWorker, FakeClock, list[RoundReport]]:
    worker = worker or FakeWorker()
    clock = FakeClock()
    reports: list[RoundReport] = []
    policy = policy or RetryPolicy(initial_delay_s=0.1, max_delay_s=1.0, jitter=0.0)
    loop = ClientLoop(
        FakeTransport(server),
        worker,
        LoopSettings(retry=policy),
        backoff=Backoff(policy, random.Random(0)),
        sleep=clock.sleep,
        clock=clock,
        on_round=reports.append,
        **kwargs,  # type: ignore[arg-type]
    )
    return loop, worker, clock, reports


def test_happy_path_trains_every_round_and_exits_on_done() -> None:
    server = FakeServer(rounds=[1, 2, 3])
    loop, worker, _, reports = _loop(server)
    stats = loop.run()
    assert stats.rounds_completed == [1, 2, 3]
    assert worker.loaded == {r: _model_payload(r) for r in (1, 2, 3)}
    assert {r for r, _ in server.counted} == {1, 2, 3}
    for (r, _), payload in server.counted.items():
        assert payload == b"update-" + _model_payload(r)[::-1]
    assert [r.round_id for r in reports] == [1, 2, 3]
    assert all(r.bytes_down >= len(_model_payload(1)) and r.bytes_up > 0 for r in reports)
    assert server.client_id_seen and all(c == "c-7" for c in server.client_id_seen)
    assert server.upload_headers[0].module_samples["mapper"] == 4
    assert server.upload_headers[0].num_samples == 10


def test_calibration_round_sends_statistics_of_the_final_model_without_exchange() -> None:
    server = FakeServer(rounds=[1, 2, 3], calibration_round=3)
    loop, worker, _, reports = _loop(server)
    stats = loop.run()
    assert worker.trained == [1, 2] and worker.calibrated == [3]
    assert worker.loaded[3] == _model_payload(3)  # downloaded like a training round
    counted = {r: payload for (r, _), payload in server.counted.items()}
    assert counted[3] == b"stats-" + _model_payload(3)
    assert server.exchanges == [1, 2]  # no projections in the calibration round
    assert server.upload_headers[-1].num_samples == 7
    assert not server.upload_headers[-1].module_samples
    assert stats.rounds_completed == [1, 2, 3] and reports[-1].round_id == 3
    assert [r.calibration for r in reports] == [False, False, True]


@pytest.mark.parametrize(
    ("sent", "trained_with"),
    [(0.0, 0.0), (0.05, 0.05), (float("nan"), 0.0), (-1.0, 0.0), (1e9, 0.0)],
)
@pytest.mark.parametrize("name", ["proximal_mu", "logit_adjustment"])
def test_the_strategys_asks_reach_local_training(
    name: str, sent: float, trained_with: float
) -> None:
    """FedProx's mu and FedLC's tau travel with the round; a value no strategy sends is
    ignored, not obeyed, and leaves the other ask alone."""
    other = "logit_adjustment" if name == "proximal_mu" else "proximal_mu"
    server = FakeServer(rounds=[1, 2], **{name: sent, other: 0.5})
    loop, worker, _, _ = _loop(server)
    assert loop.run().rounds_completed == [1, 2]
    assert [getattr(i, name) for i in worker.instructions] == [trained_with, trained_with]
    assert [getattr(i, other) for i in worker.instructions] == [0.5, 0.5]


def test_global_prototypes_reach_the_next_local_training() -> None:
    server = FakeServer(rounds=[1, 2])
    loop, worker, _, _ = _loop(server)
    loop.run()
    assert worker.prototypes_at_train == [None, b"prototypes-after-1"]
    assert server.exchanges == [1, 2]


def test_interrupted_download_resumes_from_next_chunk_index() -> None:
    server = FakeServer(rounds=[1], download_faults=[3, 2])
    loop, worker, clock, _ = _loop(server)
    stats = loop.run()
    assert stats.download_starts == [(1, 0), (1, 3), (1, 5)]
    assert worker.loaded[1] == _model_payload(1)
    assert stats.transient_failures == 2
    assert len(clock.sleeps) >= 2


def test_failed_upload_is_retried_with_the_same_upload_id_and_counted_once() -> None:
    server = FakeServer(rounds=[1, 2], upload_faults=["mid", "mid"])
    loop, worker, _, _ = _loop(server)
    stats = loop.run()
    ids_round1 = [uid for r, uid in stats.upload_attempts if r == 1]
    assert len(ids_round1) == 3 and len(set(ids_round1)) == 1
    assert [r for r, _ in server.counted] == [1, 2]
    assert worker.trained == [1, 2]  # no retraining for a transport failure
    ids_round2 = {uid for r, uid in stats.upload_attempts if r == 2}
    assert ids_round2.isdisjoint(ids_round1)


def test_lost_ack_retry_is_acknowledged_as_duplicate_not_counted_twice() -> None:
    server = FakeServer(rounds=[1], upload_faults=["ack-lost"])
    loop, _, _, reports = _loop(server)
    stats = loop.run()
    assert len(server.counted) == 1
    assert stats.rounds_completed == [1]
    assert reports[0].duplicate


def test_heartbeat_outage_backs_off_growing_then_resets_after_success() -> None:
    outage: list[object] = [TransientTransportError("UNAVAILABLE")] * 4
    server = FakeServer(rounds=[1], heartbeat_script=list(outage))
    loop, _, clock, _ = _loop(server)
    loop.run()
    assert clock.sleeps[:4] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert loop.backoff.attempt == 0  # reset by the successful steps


def test_gives_up_when_server_stays_unreachable() -> None:
    policy = RetryPolicy(initial_delay_s=0.5, max_delay_s=1.0, jitter=0.0, give_up_after_s=5.0)
    server = FakeServer(heartbeat_script=[TransientTransportError("UNAVAILABLE")] * 100)
    loop, _, clock, _ = _loop(server, policy=policy)
    with pytest.raises(ServerUnreachableError, match="unreachable"):
        loop.run()
    assert 5.0 <= clock.now <= 6.5


def test_register_action_makes_the_client_register_again() -> None:
    script: list[object] = [
        coordinator_pb2.HeartbeatResponse(action=coordinator_pb2.ACTION_WAIT, poll_after_ms=200),
        coordinator_pb2.HeartbeatResponse(action=coordinator_pb2.ACTION_REGISTER),
    ]
    server = FakeServer(rounds=[1], heartbeat_script=script)
    loop, worker, clock, _ = _loop(server)
    loop.run()
    assert server.registered == 2
    assert len(worker.registered) == 2
    assert 0.2 in clock.sleeps


def test_rejected_upload_abandons_round_and_the_loop_goes_on() -> None:
    server = FakeServer(rounds=[1, 2], upload_faults=["reject"])
    loop, worker, _, _ = _loop(server)
    stats = loop.run()
    assert stats.rejected_uploads == 1
    assert stats.abandoned_rounds == 1
    # The server still wants round 1: it is retrained and uploaded, then round 2.
    assert [r for r, _ in server.counted] == [1, 2]
    assert worker.trained == [1, 1, 2]


def test_round_abandoned_while_downloading_returns_to_heartbeat() -> None:
    class StaleDownload(FakeTransport):
        calls = 0

        def download(
            self, request: coordinator_pb2.DownloadRequest
        ) -> Iterator[common_pb2.TensorChunk]:
            StaleDownload.calls += 1
            if StaleDownload.calls == 1:
                raise RoundAbandonedError("FAILED_PRECONDITION: round 1 closed")
            yield from super().download(request)

    server = FakeServer(rounds=[1])
    worker = FakeWorker()
    clock = FakeClock()
    loop = ClientLoop(StaleDownload(server), worker, sleep=clock.sleep, clock=clock)
    stats = loop.run()
    assert stats.abandoned_rounds == 1
    assert stats.rounds_completed == [1]


def test_corrupted_download_is_refetched_and_finally_abandoned() -> None:
    server = FakeServer(rounds=[1], corrupt_downloads=1)
    loop, worker, _, _ = _loop(server)
    stats = loop.run()
    assert worker.loaded[1] == _model_payload(1)
    assert stats.download_starts[0] == (1, 0) and stats.download_starts[1] == (1, 0)

    always_bad = FakeServer(rounds=[1], corrupt_downloads=3)
    always_bad.heartbeat_script = []
    loop2, worker2, _, _ = _loop(always_bad)
    # After 3 failed verifications the round is abandoned; the 4th download is clean.
    stats2 = loop2.run()
    assert stats2.abandoned_rounds == 1
    assert worker2.loaded[1] == _model_payload(1)


def test_encrypted_upload_uses_server_key_and_rotated_key_reencrypts_same_id() -> None:
    made: list[tuple[bytes, str, int]] = []

    class XorEncryptor:
        def __init__(self, server_key: bytes, client_id: str, round_id: int) -> None:
            made.append((server_key, client_id, round_id))
            self.client_public_key = b"eph-" + server_key

        def encrypt_chunk(self, index: int, total: int, plaintext: bytes) -> bytes:
            return bytes(b ^ (index + 1) for b in plaintext)

    def decrypt(header: coordinator_pb2.UploadHeader, index: int, total: int, data: bytes) -> bytes:
        return bytes(b ^ (index + 1) for b in data)

    server = FakeServer(rounds=[1], key=b"K1", upload_faults=["mid"])
    server.decrypt = decrypt

    class RotatingKey(FakeTransport):
        def upload(
            self, messages: Iterable[coordinator_pb2.UploadMessage]
        ) -> coordinator_pb2.UploadResponse:
            try:
                return super().upload(messages)
            except TransientTransportError:
                server.key = b"K2"  # the restarted server announces a fresh key
                raise

    worker = FakeWorker()
    clock = FakeClock()
    loop = ClientLoop(
        RotatingKey(server),
        worker,
        encryptor_factory=XorEncryptor,
        sleep=clock.sleep,
        clock=clock,
    )
    stats = loop.run()
    # K1 cut mid-stream, K1 retried and refused (server has K2 now), re-encrypted under K2;
    # every attempt encrypts under its own encryptor (fresh ephemeral key: no nonce reuse)
    assert [h.encrypted for h in server.upload_headers] == [True, True, True]
    assert made == [(b"K1", "c-7", 1), (b"K1", "c-7", 1), (b"K2", "c-7", 1)]
    assert stats.rejected_uploads == 1
    assert worker.trained == [1]
    assert len({h.upload_id for h in server.upload_headers}) == 1
    assert list(server.counted.values()) == [b"update-" + _model_payload(1)[::-1]]
    assert stats.rounds_completed == [1]


def test_key_announced_but_no_encryptor_sends_in_clear() -> None:
    server = FakeServer(rounds=[1], key=b"K1")
    loop, _, _, reports = _loop(server, encryptor_factory=None)
    loop.run()
    assert server.upload_headers[0].encrypted is False
    assert not reports[0].encrypted


def test_projection_exchange_retry_does_not_redraw_noise() -> None:
    server = FakeServer(rounds=[1], exchange_faults=2)
    loop, worker, _, _ = _loop(server)
    loop.run()
    assert worker.projection_calls == 1
    assert server.exchanges == [1]


def test_fatal_server_error_propagates_with_its_message() -> None:
    server = FakeServer(heartbeat_script=[FatalServerError("UNAUTHENTICATED: bad signature")])
    loop, _, _, _ = _loop(server)
    with pytest.raises(FatalServerError, match="UNAUTHENTICATED"):
        loop.run()


def test_stop_event_ends_the_loop_between_steps() -> None:
    stop = threading.Event()
    server = FakeServer(
        heartbeat_script=[coordinator_pb2.HeartbeatResponse(action=coordinator_pb2.ACTION_WAIT)]
        * 1000
    )
    clock = FakeClock()

    def sleep_then_stop(seconds: float) -> None:
        clock.sleep(seconds)
        if len(clock.sleeps) == 3:
            stop.set()

    loop = ClientLoop(
        FakeTransport(server), FakeWorker(), stop_event=stop, sleep=sleep_then_stop, clock=clock
    )
    stats = loop.run()
    assert stats.rounds_completed == []
    assert len(clock.sleeps) == 3


def test_unknown_client_error_leads_to_registration_again() -> None:
    server = FakeServer(rounds=[1], heartbeat_script=[NotRegisteredError("NOT_FOUND: who?")])
    loop, _, clock, _ = _loop(server)
    stats = loop.run()
    assert server.registered == 2
    assert stats.rounds_completed == [1]
    assert clock.sleeps  # waited before registering again


def test_refusals_do_not_spin_without_waiting() -> None:
    refusals: list[object] = [RoundAbandonedError("FAILED_PRECONDITION: run paused")] * 5
    server = FakeServer(rounds=[1], heartbeat_script=refusals)
    loop, _, clock, _ = _loop(server)
    loop.run()
    assert len(clock.sleeps) >= 5


def test_train_again_for_an_uploaded_round_resends_the_same_update() -> None:
    server = FakeServer(rounds=[1, 2])
    original_heartbeat = FakeTransport.heartbeat
    voided = {"done": False}

    class VoidingTransport(FakeTransport):
        def heartbeat(
            self, request: coordinator_pb2.HeartbeatRequest
        ) -> coordinator_pb2.HeartbeatResponse:
            if not voided["done"] and any(r == 1 for r, _ in self.server.counted):
                # Server restarted mid-round and voided round 1's attempt.
                voided["done"] = True
                self.server.counted.clear()
            return original_heartbeat(self, request)

    worker = FakeWorker()
    clock = FakeClock()
    loop = ClientLoop(VoidingTransport(server), worker, sleep=clock.sleep, clock=clock)
    stats = loop.run()
    assert stats.resent_rounds == [1]
    assert worker.trained == [1, 2]  # no retraining for the resend
    ids_round1 = {uid for r, uid in stats.upload_attempts if r == 1}
    assert len(ids_round1) == 1
    assert [r for r, _ in server.counted] == [1, 2]
    assert stats.rounds_completed == [1, 1, 2]


def test_a_new_run_after_reregistration_forgets_the_old_runs_uploads() -> None:
    server = FakeServer(rounds=[1])

    class NewRunTransport(FakeTransport):
        runs = 0

        def register(
            self, request: coordinator_pb2.RegisterRequest
        ) -> coordinator_pb2.RegisterResponse:
            response = super().register(request)
            NewRunTransport.runs += 1
            response.run_id = f"run-{NewRunTransport.runs}"
            return response

        def heartbeat(
            self, request: coordinator_pb2.HeartbeatRequest
        ) -> coordinator_pb2.HeartbeatResponse:
            if NewRunTransport.runs == 1 and self.server.counted:
                self.server.counted.clear()  # the server was wiped: new run, round 1 again
                return coordinator_pb2.HeartbeatResponse(action=coordinator_pb2.ACTION_REGISTER)
            return super().heartbeat(request)

    worker = FakeWorker()
    clock = FakeClock()
    loop = ClientLoop(NewRunTransport(server), worker, sleep=clock.sleep, clock=clock)
    stats = loop.run()
    assert stats.resent_rounds == []  # the old run's update is never offered to the new run
    assert worker.trained == [1, 1]
    ids = [uid for _, uid in stats.upload_attempts]
    assert len(ids) == 2 and ids[0] != ids[1]


def test_the_download_buffer_pool_lives_as_long_as_the_loop_unless_disabled() -> None:
    kept, _, _, _ = _loop(FakeServer())
    pool = kept._download_buffers
    assert pool is not None and pool.lazy_free and pool.max_idle == 1
    off = ClientLoop(
        FakeTransport(FakeServer()), FakeWorker(), LoopSettings(download_buffer_idle_s=0)
    )
    assert off._download_buffers is None
