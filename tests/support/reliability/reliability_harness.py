"""Shared pieces of the fault-injection suite: a real `crossfed server` process (optionally
with a crash point armed), a small scripted Coordinator client whose uploads are known
constants (so every committed checkpoint can be checked against the exact weighted average),
read-only dumps of the state DB, checkpoint integrity checks, and the numbers each scenario
records for RELIABILITY.md."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
import yaml
from crossfed.common.config import ServerPrivacyConfig
from crossfed.common.wire.tensor_codec import decode_tensors, encode_tensors
from crossfed.v1 import coordinator_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.scripted_client import ScriptedClient
from tests.support.small_model import SMALL_MODEL
from tests.support.standin_model import standin_model

HERE = Path(__file__).resolve().parent
LAUNCHER = "tests.support.reliability.fault_injecting_server"  # run with -m
REPO_ROOT = HERE.parents[2]
# numbers each scenario records for RELIABILITY.md (runs/ is git-ignored)
RESULTS_DIR = Path(
    os.environ.get("CROSSFED_RELIABILITY_RESULTS", REPO_ROOT / "runs" / "reliability")
)
CHECKPOINTS = "checkpoints"
EXACT_FLOAT32_INT = 2**24  # integers below this are exact in float32
STATE_DB = "state.db"


class ScenarioFailure(AssertionError):
    """A fault scenario did not reach the state it must reach (with the server log tail)."""


def child_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: single-threaded torch, unbuffered output."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # the repository root, so a child can import the test helpers as tests.support.*
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def write_server_config(path: Path, **rounds: Any) -> Path:
    """A small-model ServerConfig YAML with the given `rounds` section values."""
    policy: dict[str, Any] = {"rounds": 3, "min_clients": 2, "round_deadline_s": 30.0}
    policy.update(rounds)
    path.write_text(
        yaml.safe_dump(
            {
                "model": SMALL_MODEL,
                "rounds": policy,
                # small chunks: a ~4 KB update travels as several chunks (mid-stream faults)
                "transport": {"chunk_size": 1024, "max_message_bytes": 1024 * 1024},
                # known constants checked against the exact eq.-15 average: never clipped
                "update_bound": {"max_norm_ratio": None},
            }
        )
    )
    return path


# --------------------------------------------------------------------------- server process


@dataclass
class ServerProcess:
    """One `crossfed server start` child process, via the fault-injecting launcher."""

    state_dir: Path
    port: int
    log_path: Path
    marker: Path
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(
        cls,
        state_dir: Path,
        config: Path,
        port: int,
        *,
        fault: str | None = None,
        hit: int = 1,
        extra_args: tuple[str, ...] = (),
        standin: bool = True,
    ) -> ServerProcess:
        """Start the server on 127.0.0.1:port; ``fault`` arms one crash point."""
        log_path = state_dir.parent / "server.log"
        marker = state_dir.parent / "fault_fired.txt"
        marker.unlink(missing_ok=True)
        env = child_env(CROSSFED_TEST_STANDIN="1" if standin else "0")
        env.pop("CROSSFED_FAULT_AT", None)
        if fault:
            env.update(
                CROSSFED_FAULT_AT=fault,
                CROSSFED_FAULT_HIT=str(hit),
                CROSSFED_FAULT_MARKER=str(marker),
            )
        cmd = [
            sys.executable, "-m", LAUNCHER,
            "--config", str(config), "--state-dir", str(state_dir),
            "--listen", f"127.0.0.1:{port}", "--insecure", "--allow-unencrypted-uploads",
            "--heartbeat-ms", "100", "--client-timeout-s", "30",
            "--exit-when-done", "--done-linger-s", "2", *extra_args,
        ]  # fmt: skip
        with log_path.open("ab") as log:
            log.write(f"\n==== start fault={fault} hit={hit}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        return cls(state_dir, port, log_path, marker, proc)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server log (for failure messages)."""
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Block until the gRPC health check answers SERVING, or the process exits. The
        timeout only catches a hung start: under a loaded CI machine importing torch alone has
        taken over 60 s, so it is far above any start-up time (the process check ends a failed
        start at once)."""
        end = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    if self.fault_fired():  # clients were quick: the armed fault already hit
                        return
                    raise ScenarioFailure(f"server exited during start-up:\n{self.log_tail()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise ScenarioFailure(f"server not ready after {timeout_s} s:\n{self.log_tail()}")

    def wait_exit(self, timeout_s: float) -> int:
        """Wait for the process to end; returns its exit code."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ScenarioFailure(
                f"server still running after {timeout_s} s:\n{self.log_tail()}"
            ) from None

    def fault_fired(self) -> str | None:
        """The crash point the process died at, if it did."""
        return self.marker.read_text() if self.marker.exists() else None

    def kill(self) -> None:
        """SIGKILL (idempotent)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def peak_rss_mib(self) -> float:
        """VmHWM of the (running) process, in MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
        raise ScenarioFailure("no VmHWM in /proc status")


# --------------------------------------------------------------------------- in-process server


def small_server_config(state_dir: Path, chunk_size: int = 1024, **rounds: Any) -> Any:
    """ServerConfig for an in-process server on 127.0.0.1 (port picked by the OS)."""
    from crossfed.common.config import ServerConfig

    policy: dict[str, Any] = {"rounds": 2, "min_clients": 2, "round_deadline_s": 30.0}
    policy.update(rounds)
    return ServerConfig.model_validate(
        {
            "listen": "127.0.0.1:0",
            "state_dir": str(state_dir),
            "model": SMALL_MODEL,
            "rounds": policy,
            "tls": {"insecure": True},
            "transport": {"chunk_size": chunk_size, "max_message_bytes": 1024 * 1024},
            "update_bound": {"max_norm_ratio": None},  # known constants, exact averages
        }
    )


@contextmanager
def inprocess_server(
    state_dir: Path,
    monkeypatch: Any,
    options: Any = None,
    chunk_size: int = 1024,
    **rounds: Any,
) -> Iterator[tuple[Any, str]]:
    """A CoordinatorServer in this process (stand-in model, insecure, plaintext uploads
    allowed); yields (server, target)."""
    from crossfed.server import server_app
    from crossfed.server.server_app import CoordinatorServer, ServerOptions

    monkeypatch.setattr(server_app, "build_initial_model", standin_model)
    opts = options or ServerOptions(
        tick_interval_s=0.05, heartbeat_interval_ms=100, allow_unencrypted_uploads=True
    )
    server = CoordinatorServer.create(small_server_config(state_dir, chunk_size, **rounds), opts)
    port = server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        server.stop()


def wait_until(
    predicate: Callable[[], bool],
    timeout_s: float,
    what: str,
    detail: Callable[[], str] | None = None,
) -> None:
    """Poll ``predicate`` every 20 ms; fail with ``what`` (and ``detail()``, e.g. the server's
    last events) after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    extra = f"\n{detail()}" if detail is not None else ""
    raise ScenarioFailure(f"timed out after {timeout_s} s waiting for {what}{extra}")


def recent_events(server: Any, count: int = 15) -> str:
    """The server's last ``count`` events, one per line (for failure messages)."""
    events = server.engine.store.events_after(0, limit=100_000)[-count:]
    return "\n".join(f"{e.kind} r{e.round} {e.client_id} {e.message}" for e in events)


# --------------------------------------------------------------------------- known uploads


def upload_value(client_index: int, round_no: int) -> float:
    """The constant every float tensor of client ``client_index``'s round-``round_no``
    update holds. Small integers: all weighted sums stay exact in float32, so the server's
    average can be compared bit for bit with `expected_average`."""
    return float(1 + client_index % 97 + 7 * round_no)


def samples_of(client_index: int) -> int:
    """|D_i| per client (eq. 15 weights), distinct among 64 neighbours: a double-counted or
    lost upload shifts the average. Bounded so 300+ clients keep float32 sums exact."""
    return 3 + 2 * (client_index % 64)


def constant_update(template: Mapping[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    """Floats filled with ``value``; integer buffers sent back unchanged (server keeps its own)."""
    return {
        k: torch.full_like(v, value) if v.is_floating_point() else v.clone()
        for k, v in template.items()
    }


def expected_average(
    template: Mapping[str, torch.Tensor], contributions: list[tuple[float, int]]
) -> dict[str, torch.Tensor]:
    """Eq. 15 for constant updates: sum_i n_i v_i / sum_i n_i per float tensor, computed the
    way the server does (float32 accumulate of exact integers, one division); integer buffers
    keep the template (input model) value."""
    out = {}
    for key, glob in template.items():
        if not glob.is_floating_point():
            out[key] = glob.clone()
            continue
        total = sum(n for _, n in contributions)
        weighted = sum(v * n for v, n in contributions)
        if weighted >= EXACT_FLOAT32_INT:
            raise ScenarioFailure(
                f"sum n_i*v_i = {weighted:g} >= 2^24: float32 sums are no longer exact, the "
                "bit-for-bit check would be order dependent; use fewer clients or rounds"
            )
        acc = torch.full_like(glob, weighted)
        out[key] = (acc / float(total)).to(glob.dtype)
    return out


#: The projection noise the server mandates by default (privacy.noise_multiplier, clip 1).
PROJECTION_SIGMA = ServerPrivacyConfig().noise_multiplier


def projection_payload(client_index: int, scale: float = 1.0) -> bytes:
    """A valid eq.-16 release for SMALL_MODEL under the default mandate, as an honest daemon
    makes it: per-class means (norm <= 1) plus N(0, sigma^2) noise, presence counts."""
    g = torch.Generator().manual_seed(client_index)
    c, dt, di = SMALL_MODEL["num_classes"], SMALL_MODEL["text_dim"], SMALL_MODEL["image_dim"]

    def noised(dim: int) -> torch.Tensor:
        means = torch.nn.functional.normalize(torch.randn(c, dim, generator=g), dim=1) * scale
        return means + PROJECTION_SIGMA * torch.randn(c, dim, generator=g)

    return encode_tensors(
        {
            "text_sum": noised(dt),
            "image_sum": noised(di),
            "text_count": torch.ones(c),
            "image_count": torch.ones(c),
        }
    )


# --------------------------------------------------------------------------- scripted client


@dataclass
class LightClient(ScriptedClient):
    """The scripted client of the fault suite: |D_i| and every upload are known constants of
    its ``index`` (see `samples_of`, `upload_value`), uploads of a round keep one upload id
    (a retry is a retry), and transient failures are not retried by gRPC underneath."""

    chunk_size: int = 1024  # a ~4 KB update travels as several chunks
    grpc_retries: bool = False
    stream_timeout_s: float = 30.0
    index: int = 0
    upload_ids: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.num_samples = samples_of(self.index)
        super().__post_init__()

    def upload(  # type: ignore[override]
        self, round_no: int, update: Mapping[str, torch.Tensor], upload_id: str | None = None
    ) -> coordinator_pb2.UploadResponse:
        uid = upload_id or self.upload_ids.setdefault(round_no, uuid.uuid4().hex)
        return super().upload(round_no, update, upload_id=uid)

    def exchange(
        self,
        round_no: int,
        payload: bytes,
        epsilon: float = 0.0,
        noise_multiplier: float = PROJECTION_SIGMA,
        clip_norm: float = 1.0,
    ) -> coordinator_pb2.ProjectionExchangeResponse:
        """Declares the default mandate (sigma, clip 1), as an honest daemon does."""
        return super().exchange(round_no, payload, epsilon, noise_multiplier, clip_norm)

    def train_and_upload(
        self, round_no: int, exchange: bool = True
    ) -> coordinator_pb2.UploadResponse:
        """Download round ``round_no``'s input, exchange projections (eq. 16), upload this
        client's known constant."""
        start = self.download(round_no)
        if exchange:
            try:
                self.exchange(round_no, projection_payload(self.index))
            except grpc.RpcError as exc:  # refused (e.g. budget): like the daemon, upload anyway
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:  # type: ignore[attr-defined]
                    raise
        return self.upload(round_no, constant_update(start, upload_value(self.index, round_no)))


#: Status codes a resilient scripted client rides out while a server dies and restarts.
RIDE_OUT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


class ResilientClientThread(threading.Thread):
    """Drives one `LightClient` until DONE, re-registering and retrying through server deaths.
    Anything but a ride-out status (UNKNOWN, INTERNAL, INVALID_ARGUMENT, ...) is recorded as an
    error: the server must never answer a well-formed client that way."""

    def __init__(
        self,
        client: LightClient,
        stop: threading.Event,
        hold_after_round: int | None = None,
        release: threading.Event | None = None,
    ) -> None:
        super().__init__(name=f"client-{client.client_id}", daemon=True)
        self.client = client
        self.stop = stop
        # after its upload for `hold_after_round` is accepted the client goes quiet until
        # `release` is set, so the test decides when the next round may start
        self.hold_after_round = hold_after_round
        self.release = release or threading.Event()
        self.errors: list[str] = []
        self.accepted: list[int] = []
        self.asked: list[int] = []  # rounds the server asked this client to train
        self.ride_outs: list[str] = []
        self.done = False

    def run(self) -> None:
        client, registered = self.client, False
        while not self.stop.is_set():
            try:
                if not registered:
                    client.register()
                    registered = True
                hb = client.heartbeat()
                if hb.action == coordinator_pb2.ACTION_DONE:
                    self.done = True
                    return
                if hb.action == coordinator_pb2.ACTION_REGISTER:
                    registered = False
                elif hb.action == coordinator_pb2.ACTION_TRAIN:
                    self.asked.append(int(hb.round))
                    reply = client.train_and_upload(int(hb.round))
                    if reply.accepted:
                        self.accepted.append(int(hb.round))
                        if int(hb.round) == self.hold_after_round:
                            while not (self.release.wait(0.05) or self.stop.is_set()):
                                pass
                    continue
                time.sleep(0.05)
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                if code == grpc.StatusCode.NOT_FOUND:
                    registered = False
                elif code not in RIDE_OUT_CODES:
                    self.errors.append(f"{code.name}: {exc.details()}")  # type: ignore[attr-defined]
                    return
                self.ride_outs.append(code.name)
                time.sleep(0.1)


# --------------------------------------------------------------------------- state checks


def dump_db(db_path: Path, drop: Mapping[str, tuple[str, ...]] | None = None) -> dict[str, Any]:
    """Every table of the state DB as sorted rows (read-only connection); ``drop`` names
    columns to leave out per table ('*' drops the table)."""
    drop = drop or {}
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        out: dict[str, Any] = {}
        for table in sorted(tables):
            skip = drop.get(table, ())
            if "*" in skip:
                continue
            cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            keep = [c for c in cols if c not in skip]
            rows = conn.execute(f"SELECT {', '.join(keep)} FROM {table}").fetchall()
            out[table] = sorted(rows, key=repr)
        return out
    finally:
        conn.close()


def checkpoint_digests(state_dir: Path) -> dict[str, str]:
    """name -> sha256 of every file in the checkpoint directory."""
    directory = state_dir / CHECKPOINTS
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def assert_checkpoints_whole(state_dir: Path) -> list[int]:
    """Every global checkpoint decodes completely and names its own round; no temp file of a
    killed write is left (the server removes them at start). Returns the rounds on disk."""
    directory = state_dir / CHECKPOINTS
    leftovers = [p.name for p in directory.iterdir() if ".tmp-" in p.name]
    if leftovers:
        raise ScenarioFailure(f"temp files of a killed write left behind: {leftovers}")
    rounds = []
    for path in sorted(directory.glob("global-*.safetensors")):
        from crossfed.common.wire.tensor_codec import decode_metadata

        payload = path.read_bytes()
        decode_tensors(payload)  # raises on a torn/truncated file
        meta = decode_metadata(payload)
        round_no = int(path.name.split("-")[1].split(".")[0])
        if meta.get("round") != str(round_no):
            raise ScenarioFailure(f"{path.name} says it is round {meta.get('round')}")
        rounds.append(round_no)
    return rounds


@dataclass(frozen=True)
class RoundRow:
    """One row of the rounds table."""

    round: int
    attempt: int
    state: str
    received: int
    message: str


def rounds_of(state_dir: Path) -> list[RoundRow]:
    """Every round attempt, in (round, attempt) order."""
    conn = sqlite3.connect(f"file:{state_dir / STATE_DB}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT round, attempt, state, received, message FROM rounds ORDER BY round, attempt"
        ).fetchall()
    finally:
        conn.close()
    return [RoundRow(int(r[0]), int(r[1]), r[2], int(r[3]), r[4]) for r in rows]


def uploads_of(state_dir: Path, round_no: int, attempt: int) -> list[tuple[str, int, str]]:
    """(client_id, num_samples, upload_id) of the uploads counted in one attempt."""
    conn = sqlite3.connect(f"file:{state_dir / STATE_DB}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT client_id, num_samples, upload_id FROM uploads WHERE round=? AND attempt=?",
            (round_no, attempt),
        ).fetchall()
    finally:
        conn.close()
    return [(r[0], int(r[1]), r[2]) for r in rows]


def run_row(state_dir: Path) -> tuple[str, int, int]:
    """(state, last_committed_round, total_rounds) of the run."""
    conn = sqlite3.connect(f"file:{state_dir / STATE_DB}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT state, last_committed_round, total_rounds FROM run").fetchone()
    finally:
        conn.close()
    return str(row[0]), int(row[1]), int(row[2])


def verify_committed_history(
    state_dir: Path, initial: Mapping[str, torch.Tensor], index_of: Callable[[str], int]
) -> int:
    """The run's whole history is sound: rounds 1..last committed exactly once each, in order,
    and every committed checkpoint still on disk equals the exact eq.-15 average of the uploads
    its committed attempt counted (each client once). Returns the number of committed rounds."""
    rows = rounds_of(state_dir)
    committed = [r for r in rows if r.state == "committed"]
    numbers = [r.round for r in committed]
    _, last, _ = run_row(state_dir)
    if numbers != list(range(1, last + 1)):
        raise ScenarioFailure(f"committed rounds {numbers} != 1..{last} exactly once each")
    on_disk = set(assert_checkpoints_whole(state_dir))
    model = dict(initial)
    for row in committed:
        ups = uploads_of(state_dir, row.round, row.attempt)
        clients = [u[0] for u in ups]
        if len(set(clients)) != len(clients) or len(ups) != row.received:
            raise ScenarioFailure(f"round {row.round}: uploads {ups} vs received {row.received}")
        contributions = [(upload_value(index_of(c), row.round), n) for c, n, _ in ups]
        model = expected_average(model, contributions)
        if row.round in on_disk:
            path = state_dir / CHECKPOINTS / f"global-{row.round:06d}.safetensors"
            got = decode_tensors(path.read_bytes())
            for key, want in model.items():
                if not torch.equal(got[key], want):
                    raise ScenarioFailure(
                        f"round {row.round} checkpoint {key} != exact average of {ups}"
                    )
    return len(committed)


# --------------------------------------------------------------------------- recorded numbers


def record_result(scenario: str, **numbers: Any) -> None:
    """Merge ``numbers`` into RESULTS_DIR/<scenario>.json (read by write_report.py)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{scenario}.json"
    data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    data.update(numbers)
    data["recorded_unix_s"] = time.time()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def iter_chunks(payload: bytes, size: int) -> Iterator[bytes]:
    """Consecutive ``size``-byte slices of ``payload``."""
    for start in range(0, len(payload), size):
        yield payload[start : start + size]
