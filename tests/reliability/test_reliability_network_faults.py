"""Network faults between the real client daemon loop (ClientLoop + GrpcTransport, encrypted
uploads) and a real server, injected by a TCP proxy on 127.0.0.1: delays, connections reset
mid-download / mid-upload / mid-response (truncated streams), and an upload whose response is
lost after the server counted it. The daemons recover and finish the run, and no update is
ever counted twice: every committed checkpoint is the exact average of one upload per client."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from crossfed.client.backoff import RetryPolicy
from crossfed.client.loop import (
    ClientLoop,
    LoopSettings,
    ProjectionUpload,
    Registered,
    Registration,
    RoundReport,
)
from crossfed.client.transport import CallDeadlines, ChannelOptions, ChannelSecurity, GrpcTransport
from crossfed.client.update_upload import LocalUpdate, default_encryptor_factory
from crossfed.common.round_instructions import PLAIN, RoundInstructions
from crossfed.common.wire.tensor_codec import decode_tensors, encode_tensors
from crossfed.server.server_app import ServerOptions

from tests.support.reliability.reliability_harness import (
    constant_update,
    inprocess_server,
    projection_payload,
    record_result,
    samples_of,
    upload_value,
    uploads_of,
    verify_committed_history,
    wait_until,
)
from tests.support.reliability.tcp_fault_proxy import CutPlan, TcpFaultProxy
from tests.support.small_model import small_model_config
from tests.support.standin_model import standin_state


@dataclass
class ConstantWorker:
    """RoundWorker without training: the update is the client's known constant (eq. 15 check)."""

    index: int
    share_projections: bool = True
    before_upload: threading.Event | None = None  # train() blocks until set
    on_train: list = field(default_factory=list)  # callables run when train() is called
    template: dict[str, torch.Tensor] = field(default_factory=dict)

    def registration(self) -> Registration:
        return Registration(modality=1, num_samples=samples_of(self.index), num_paired=0,
                            num_text_only=0, num_image_only=0)  # fmt: skip

    def on_registered(self, registered: Registered) -> None:
        pass

    def load_global(self, round_id: int, payload: bytes) -> None:
        self.template = decode_tensors(payload)

    def train(
        self,
        round_id: int,
        local_epochs: int | None,
        instructions: RoundInstructions = PLAIN,
    ) -> LocalUpdate:
        if self.before_upload is not None:
            self.before_upload.wait(30)
        for hook in self.on_train:
            hook()
        update = constant_update(self.template, upload_value(self.index, round_id))
        return LocalUpdate(payload=encode_tensors(update), num_samples=samples_of(self.index))

    def projections(self, round_id: int) -> ProjectionUpload | None:
        if not self.share_projections:
            return None
        return ProjectionUpload(projection_payload(self.index))

    def receive_prototypes(self, round_id: int, payload: bytes) -> None:
        pass


class DaemonThread(threading.Thread):
    """One real ClientLoop over a real gRPC channel to ``address``, run to DONE."""

    def __init__(
        self,
        address: str,
        worker: ConstantWorker,
        stop: threading.Event,
        give_up_after_s: float = 60.0,
    ) -> None:
        super().__init__(name=f"daemon-c{worker.index}", daemon=True)
        cid = f"c{worker.index}"
        self.transport = GrpcTransport.connect(
            address,
            ChannelSecurity(insecure=True),
            CallDeadlines(unary_s=5.0, heartbeat_s=3.0, transfer_s=20.0),
            client_id=cid,
            options=ChannelOptions(min_reconnect_backoff_ms=50, max_reconnect_backoff_ms=300),
        )
        self.reports: list[RoundReport] = []
        self.loop = ClientLoop(
            self.transport,
            worker,
            LoopSettings(
                retry=RetryPolicy(
                    initial_delay_s=0.05, max_delay_s=0.5, give_up_after_s=give_up_after_s
                ),
                default_poll_s=0.1,
                chunk_size=1024,
            ),
            client_id=cid,
            encryptor_factory=default_encryptor_factory(),
            stop_event=stop,
            on_round=self.reports.append,
        )
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.loop.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.transport.close()


def _initial() -> dict[str, torch.Tensor]:
    return standin_state(small_model_config(), 0)


def _options() -> ServerOptions:
    return ServerOptions(tick_interval_s=0.05, heartbeat_interval_ms=100, auto_start=False,
                         client_timeout_s=20.0)  # fmt: skip


def test_lost_upload_response_is_retried_and_counted_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """c0's upload reaches the server and is counted; the proxy holds the response and resets
    the connection. The daemon retries the same upload_id: the server answers duplicate, the
    round commits with c0 once (exact average of c0 and c1)."""
    state_dir = tmp_path / "state"
    stop = threading.Event()
    with inprocess_server(state_dir, monkeypatch, _options(), rounds=1, min_clients=2) as (
        server,
        target,
    ):
        proxy = TcpFaultProxy(target)
        release_c1 = threading.Event()
        w0 = ConstantWorker(0, share_projections=False, on_train=[proxy.freeze_downstream])
        w1 = ConstantWorker(1, before_upload=release_c1)
        daemons = [DaemonThread(proxy.address, w0, stop), DaemonThread(target, w1, stop)]
        try:
            for d in daemons:
                d.start()
            wait_until(lambda: len(server.engine.clients()) == 2, 20, "both registered")
            server.engine.start()
            wait_until(lambda: bool(uploads_of(state_dir, 1, 1)), 20, "c0's upload counted")
            assert proxy.cut_all() >= 1  # the response dies in the proxy
            proxy.thaw_downstream()
            wait_until(lambda: bool(daemons[0].reports), 20, "c0 finishing round 1")
            release_c1.set()
            for d in daemons:
                d.join(timeout=30)
        finally:
            stop.set()
            release_c1.set()
            proxy.close()
    for d in daemons:
        assert d.error is None, repr(d.error)
        assert d.loop.phase.value == "done"
    loop0 = daemons[0].loop
    attempts = loop0.stats.upload_attempts
    assert len(attempts) >= 2 and len({uid for _, uid in attempts}) == 1, attempts
    assert daemons[0].reports[0].duplicate, "the retry should have been answered as duplicate"
    assert sorted(c for c, _, _ in uploads_of(state_dir, 1, 1)) == ["c0", "c1"]
    assert verify_committed_history(state_dir, _initial(), lambda c: int(c[1:])) == 1
    record_result("network_lost_response", lost_responses=1, duplicates_detected=1,
                  double_counted=0)  # fmt: skip


def _run_faulty_federation(
    root: Path, monkeypatch: pytest.MonkeyPatch, plans: list[tuple[float, CutPlan]], rounds: int
) -> dict[str, int]:
    state_dir = root / "state"
    stop = threading.Event()
    with inprocess_server(state_dir, monkeypatch, _options(), rounds=rounds,
                          min_clients=len(plans), round_deadline_s=30.0) as (server, target):  # fmt: skip
        proxies = [TcpFaultProxy(target, delay_s=delay, plan=plan) for delay, plan in plans]
        daemons = [DaemonThread(p.address, ConstantWorker(i), stop) for i, p in enumerate(proxies)]
        try:
            for d in daemons:
                d.start()
            wait_until(lambda: len(server.engine.clients()) == len(plans), 30, "registrations")
            server.engine.start()
            for d in daemons:
                d.join(timeout=120)
        finally:
            stop.set()
            for p in proxies:
                p.close()
        run = server.engine.run
    for d in daemons:
        assert d.error is None, repr(d.error)
        assert d.loop.phase.value == "done", d.loop.phase
    assert run.state == "completed", run
    assert verify_committed_history(state_dir, _initial(), lambda c: int(c[1:])) == rounds
    for i, p in enumerate(proxies):
        if plans[i][1].upstream or plans[i][1].downstream:
            assert p.stats.cuts >= 1, f"proxy {i} never cut: the fault was not injected"
    return {
        "cuts": sum(p.stats.cuts for p in proxies),
        "connections": sum(p.stats.connections for p in proxies),
        "delayed_blocks": sum(p.stats.delayed_blocks for p in proxies),
        "transient_failures": sum(d.loop.stats.transient_failures for d in daemons),
        "abandoned_rounds": sum(d.loop.stats.abandoned_rounds for d in daemons),
        "duplicates": sum(r.duplicate for d in daemons for r in d.reports),
    }


def test_daemons_ride_out_cuts_delays_and_truncated_streams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three daemons, each behind its own faulty proxy: c0's uploads are truncated (resets
    after 2.5/4/6 KB sent), c1's downloads and responses are truncated (resets after 1.5/3/7
    KB received), c2 is delayed 20 ms per block and reset once each way. 2 rounds complete."""
    started = time.monotonic()
    plans = [
        (0.0, CutPlan(upstream=[2500, 4000, 6000])),
        (0.0, CutPlan(downstream=[1500, 3000, 7000])),
        (0.02, CutPlan(upstream=[None, 9000], downstream=[5000])),
    ]
    counts = _run_faulty_federation(tmp_path, monkeypatch, plans, rounds=2)
    record_result("network_faults_fast", rounds=2, daemons=3,
                  seconds=round(time.monotonic() - started, 1), **counts)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_daemons_ride_out_random_fault_schedules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Random cut schedules (first 4 connections of each of 4 daemons) over 3 rounds."""
    import random

    rng = random.Random(seed)

    def schedule(first: bool) -> list[int | None]:
        # the first connection is always cut in one direction, so every proxy injects a fault
        head: list[int | None] = [rng.randrange(200, 12_000) if first else None]
        return head + [rng.choice([None, rng.randrange(200, 12_000)]) for _ in range(3)]

    plans = []
    for _ in range(4):
        up_first = rng.random() < 0.5
        plan = CutPlan(upstream=schedule(up_first), downstream=schedule(not up_first))
        plans.append((rng.choice([0.0, 0.0, 0.01]), plan))
    counts = _run_faulty_federation(tmp_path, monkeypatch, plans, rounds=3)
    record_result(f"network_faults_random_{seed}", rounds=3, daemons=4, **counts)


@pytest.mark.slow
def test_daemon_recovers_from_a_silent_partition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After round 1, c0's connection is blackholed (bytes dropped, no RST: a network
    partition). The daemon only notices through call deadlines and gRPC keepalive; it must
    reconnect, upload round 2 once, and the run completes. Records the recovery time."""
    state_dir = tmp_path / "state"
    stop = threading.Event()
    with inprocess_server(state_dir, monkeypatch, _options(), rounds=2, min_clients=2,
                          round_deadline_s=300.0) as (server, target):  # fmt: skip
        proxy = TcpFaultProxy(target)
        daemons = [
            DaemonThread(proxy.address, ConstantWorker(0), stop, give_up_after_s=300),
            DaemonThread(target, ConstantWorker(1), stop, give_up_after_s=300),
        ]
        try:
            for d in daemons:
                d.start()
            wait_until(lambda: len(server.engine.clients()) == 2, 20, "registrations")
            server.engine.start()
            wait_until(lambda: server.engine.run.last_committed_round >= 1, 30, "round 1")
            started = time.monotonic()
            assert proxy.stall_all() >= 1
            wait_until(
                lambda: any(
                    c == "c0" for a in (1, 2, 3) for c, _, _ in uploads_of(state_dir, 2, a)
                ),
                240,
                "c0's round-2 upload after the partition",
            )
            recovery_s = time.monotonic() - started
            for d in daemons:
                d.join(timeout=60)
        finally:
            stop.set()
            proxy.close()
    for d in daemons:
        assert d.error is None, repr(d.error)
    assert verify_committed_history(state_dir, _initial(), lambda c: int(c[1:])) == 2
    record_result(
        "network_silent_partition",
        recovery_s=round(recovery_s, 1),
        heartbeat_deadline_s=3.0,
        keepalive_time_ms=ChannelOptions().keepalive_time_ms,
        transient_failures=daemons[0].loop.stats.transient_failures,
    )
