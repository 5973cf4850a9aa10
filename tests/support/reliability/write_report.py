"""Render RELIABILITY.md (repo root) from the numbers the reliability scenarios recorded in
runs/reliability/*.json. Run the suite first, then this script:

    ./dev test tests/reliability            # fast part (the default run does it too)
    ./dev test tests/reliability -m slow    # long part: every crash point, 10k+ fuzz cases
    .venv/bin/python tests/support/reliability/write_report.py [--results DIR] [--out FILE]

A scenario that did not run is listed as such: the report never shows a number that was not
measured by the suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]
DEFAULT_RESULTS = REPO_ROOT / "runs" / "reliability"
DEFAULT_OUT = REPO_ROOT / "RELIABILITY.md"

# Bugs the suite found in server code and the fix commits (history, not measurements).
BUGS_FOUND = [
    (
        (
            "server kill between checkpoint write and DB commit with keep_checkpoints=1 left a state "
            "dir the server refused to start from (the last committed checkpoint was already pruned)"
        ),
        "fix(server): prune old checkpoints only after the round's DB commit",
    ),
    (
        (
            "Register with num_samples (or parts) >= 2^63 and UploadUpdate with round / num_samples / "
            "module_samples >= 2^63 answered UNKNOWN with the exception text (SQLite int64 overflow); "
            "Register also left the client in memory but not in the DB"
        ),
        "fix(server): uint64 counts beyond int64 are INVALID_ARGUMENT",
    ),
    (
        (
            "ExchangeProjections accepted epsilon_spent=inf (persisted as the run's epsilon) and, "
            "before the first commit, projections for 'round 0' from any registered client"
        ),
        "same commit",
    ),
    (
        "Admin StreamEvents with after_event_id >= 2^63 answered UNKNOWN",
        "fix(admin): StreamEvents cursor clamp",
    ),
    (
        (
            "a checkpoint write failing with ENOSPC/EROFS escaped as UNKNOWN to the uploading client, "
            "recorded no event and was retried (with a logged traceback) on every tick"
        ),
        "fix(server): failed checkpoint write fails the attempt with an event and an ERROR log",
    ),
]

KNOWN_GAPS = [
    (
        "Bounded influence covers model updates and projections; calibration-round statistics "
        "(opt-in) are checked for plausibility (whole counts, sums of squares) but not "
        "norm-bounded: a hostile holder of images can still skew the image-only refit (an "
        "unusable fit leaves the model uncalibrated)."
    ),
    (
        "The update bound limits how far one update moves the model per round (0.5 x its norm "
        "by default), not where many colluding clients steer it; and sample counts are the "
        "client's word, so a client registering many rows carries more of eq. 15's weight "
        "(within the bound)."
    ),
    (
        "A client that trickles its upload (a chunk just inside upload_idle_timeout_s) keeps "
        "its one upload slot that long; several identities can hold several slots."
    ),
    (
        "The nonce journal is fsynced about once a second: after a power loss (not a process "
        "kill) a request accepted in the last second before it could be replayed within the "
        "clock window."
    ),
    (
        "Under projection DP the released class counts are presence bits (0 or 1), published "
        "exactly; the epsilon the server accounts covers the noised rows, not which classes a "
        "client holds."
    ),
    (
        "Disk full is simulated for the checkpoint and prototypes writes only. An SQLite write "
        "failing (StateStoreError) mid-commit is not handled: the engine mutates its in-memory "
        "run/round/client records before the DB write, so memory can run ahead of the DB until "
        "a restart (same for _save_client on register)."
    ),
    (
        "A silently dead connection (no RST: a network partition) is noticed only through call "
        "deadlines and gRPC keepalive (client: 30 s ping + 20 s timeout); the measured recovery "
        "time is in the network table. With the daemon's production deadlines (heartbeat 10 s, "
        "transfer 600 s) a download caught in a partition may wait for keepalive."
    ),
    (
        "The server sheds load with RESOURCE_EXHAUSTED beyond maximum_concurrent_rpcs "
        "(4 x 32 workers); clients must retry (the daemon does, as transient). The retry counts "
        "are in the load section. grpc.aio clients (not the daemon, which is sync grpc) "
        "sometimes see that refusal of a client stream as INTERNAL 'Internal error from Core'; "
        "the daemon's classify_rpc_error retries that INTERNAL as transient (with backoff)."
    ),
    (
        "Crash points live in a launcher that wraps server functions (no hook in server code). "
        "If a wrapped function is renamed, the fault no longer fires and the scenario fails with "
        "'server exited without reaching <point>' (this happened once, when checkpoints.py "
        "gained a writer of its own; every replaced file now goes through "
        "common/atomic_files.write_atomic, which the launcher wraps)."
    ),
    (
        "Load latencies come from one asyncio client process sharing the 2-core host with the "
        "server (and, during these runs, other engineers' jobs: see host_load_1min)."
    ),
]


def _load(results: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if results.is_dir():
        for path in sorted(results.glob("*.json")):
            try:
                out[path.stem] = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise SystemExit(f"write_report: {path} is not valid JSON: {exc}") from None
    return out


def _when(data: dict[str, Any]) -> str:
    stamp = data.get("recorded_unix_s")
    if not isinstance(stamp, int | float):
        return "?"
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def render(results: dict[str, dict[str, Any]]) -> str:
    """The RELIABILITY.md text for the recorded ``results``."""
    kills = {k: v for k, v in results.items() if k.startswith("server_kill")}
    fuzz = {k: v for k, v in results.items() if k.startswith("fuzz_")}
    net = {k: v for k, v in results.items() if k.startswith("network_")}
    load = {k: v for k, v in results.items() if k.startswith("load_")}
    disk = {k: v for k, v in results.items() if k.startswith("disk_full")}
    client = {k: v for k, v in results.items() if k.startswith("client_faults")}
    attacks = {k: v for k, v in results.items() if k.startswith("attack_")}
    restarts = sum(int(v.get("restarts", 0)) for v in kills.values())
    fuzz_cases = sum(int(v.get("cases", 0)) for v in fuzz.values())
    improper = sum(int(v.get("improper", 0)) for v in fuzz.values())
    cuts = sum(int(v.get("cuts", 0)) for v in net.values())
    biggest = max(load.values(), key=lambda v: int(v.get("clients", 0)), default=None)

    lines = [
        "# Reliability report",
        "",
        (
            "Generated by `tests/support/reliability/write_report.py` from the numbers the fault-injection "
            "suite (`tests/reliability/`) recorded in `runs/reliability/`. Regenerate: run "
            "`./dev test tests/reliability` (fast part) and `./dev test tests/reliability -m slow` "
            "(long part), then the script. Every scenario asserts the final state (run completed, "
            "rounds committed once and in order, every committed checkpoint equal to the exact "
            "eq.-15 average of the uploads its attempt counted, no torn file), not just 'no crash'."
        ),
        "",
        (
            f"Host: {platform.machine()}, Python {platform.python_version()}; "
            f"{len(results)} scenario records."
        ),
        "",
        "## Summary",
        "",
        _row(["what", "result"]),
        _row(["---", "---"]),
        _row(
            [
                "server SIGKILLs survived (restart on the same state dir)",
                f"{restarts} in {len(kills)} runs",
            ]
        ),
        _row(
            [
                "client faults (killed mid-download/-upload, never returned, late upload)",
                f"{len(client)} scenarios passed" if client else "not run",
            ]
        ),
        _row(
            [
                "network faults: connection resets injected by the TCP proxy",
                f"{cuts} resets in {len(net)} runs, 0 updates counted twice",
            ]
        ),
        _row(
            [
                "fuzzed RPC cases (Coordinator + Admin; insecure + unauthenticated TLS)",
                f"{fuzz_cases} cases, {improper} improper answers",
            ]
        ),
        _row(
            [
                "load held",
                (
                    f"{biggest['clients']} concurrent clients x {biggest['rounds']} "
                    f"rounds, every upload aggregated exactly once"
                )
                if biggest
                else "not run",
            ]
        ),
        _row(
            [
                "disk full / read-only at checkpoint time",
                f"{len(disk)} scenarios passed" if disk else "not run",
            ]
        ),
        _row(
            [
                "attacks by an enrolled hostile client (and hostile inputs), see below",
                f"{len(attacks)} held" if attacks else "not run",
            ]
        ),
        "",
    ]

    lines += ["## Server SIGKILL at named crash points", ""]
    if kills:
        lines += [
            _row(["run", "faults", "restarts", "round attempts", "committed", "recorded"]),
            _row(["---"] * 6),
        ]
        for name, v in sorted(kills.items()):
            faults = ", ".join(v.get("faults", [])) or name.removeprefix("server_kill_")
            lines.append(
                _row(
                    [
                        name,
                        faults,
                        v.get("restarts"),
                        v.get("round_attempts"),
                        v.get("committed_rounds"),
                        _when(v),
                    ]
                )
            )
    else:
        lines.append("not run")
    lines += ["", "## Client faults", ""]
    for name, v in sorted(client.items()):
        facts = ", ".join(f"{k}={v[k]}" for k in sorted(v) if k != "recorded_unix_s")
        lines.append(f"- `{name}`: {facts}")
    if not client:
        lines.append("not run")
    lines += ["", "## Network faults (TCP proxy between daemon and server)", ""]
    if net:
        keys = [
            "rounds",
            "daemons",
            "cuts",
            "connections",
            "transient_failures",
            "abandoned_rounds",
            "duplicates",
            "lost_responses",
            "duplicates_detected",
            "recovery_s",
        ]
        lines += [_row(["run", *keys]), _row(["---"] * (len(keys) + 1))]
        for name, v in sorted(net.items()):
            lines.append(_row([name, *(v.get(k, "") for k in keys)]))
    else:
        lines.append("not run")
    lines += ["", "## Fuzzing", ""]
    if fuzz:
        lines += [_row(["run", "cases", "improper", "seconds", "statuses"]), _row(["---"] * 5)]
        for name, v in sorted(fuzz.items()):
            statuses = ", ".join(f"{k} {n}" for k, n in sorted(v.get("statuses", {}).items()))
            lines.append(
                _row([name, v.get("cases"), v.get("improper"), v.get("seconds"), statuses])
            )
        lines += ["", "Cases per RPC (all runs):", ""]
        per: dict[str, int] = {}
        for v in fuzz.values():
            for rpc, n in v.get("per_rpc", {}).items():
                per[rpc] = per.get(rpc, 0) + int(n)
        lines += [f"- `{rpc}`: {n}" for rpc, n in sorted(per.items())]
        lines += [
            "",
            (
                "INTERNAL answers are gRPC's own fixed reply to bytes that do not parse as "
                "the request message ('Exception deserializing request!'); an INTERNAL from a "
                "servicer, any UNKNOWN, or a trace/path in the details fails the suite."
            ),
        ]
    else:
        lines.append("not run")
    lines += ["", "## Load", ""]
    if load:
        keys = [
            "clients",
            "rounds",
            "seconds",
            "rounds_per_s",
            "rpcs",
            "rpc_p50_ms",
            "rpc_p99_ms",
            "upload_p50_ms",
            "upload_p99_ms",
            "heartbeat_p99_ms",
            "server_peak_rss_mib",
            "uploads_accepted",
            "duplicates",
            "host_load_1min",
        ]
        lines += [_row(["run", *keys]), _row(["---"] * (len(keys) + 1))]
        for name, v in sorted(load.items()):
            lines.append(_row([name, *(v.get(k, "") for k in keys)]))
        lines.append("")
        for name, v in sorted(load.items()):
            lines.append(f"- `{name}` retried statuses: {v.get('retried', {})}")
        lines += [
            "",
            (
                "Latencies are measured by the clients (one asyncio process, 1-2 CPU cores "
                "shared with the server), so they include client-side scheduling delay."
            ),
        ]
    else:
        lines.append("not run")
    lines += ["", "## Disk full / read-only state dir at checkpoint time", ""]
    for name, v in sorted(disk.items()):
        facts = ", ".join(
            f"{k}={v[k]}" for k in sorted(v) if k not in ("recorded_unix_s", "recorded")
        )
        lines.append(f"- `{name}`: {facts}")
    if not disk:
        lines.append("not run")
    lines += ["", "## Attacks", ""]
    if attacks:
        lines += [
            (
                "Each row is a scenario of `tests/reliability/test_reliability_attacks_*.py` "
                "that carries out the attack against the real server (TLS, enrolled clients "
                "signing every call, production defaults) or the real CLI; the row is recorded "
                "only when the scenario held, and *observed* is what the suite saw."
            ),
            "",
            _row(["attack", "attempt", "expected", "observed"]),
            _row(["---"] * 4),
        ]
        for name, v in sorted(attacks.items()):
            cells = [v.get(k, "") for k in ("attempt", "expected", "observed")]
            lines.append(
                _row([name.removeprefix("attack_"), *(str(c).replace("|", "\\|") for c in cells)])
            )
    else:
        lines.append("not run")
    lines += ["", "## Bugs found by this suite (fixed)", ""]
    lines += [f"- {what} — *{fix}*" for what, fix in BUGS_FOUND]
    lines += ["", "## Known gaps", ""]
    lines += [f"- {gap}" for gap in KNOWN_GAPS]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the report; exit 1 when no results exist."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    results = _load(args.results)
    if not results:
        sys.stderr.write(
            f"write_report: no results in {args.results}; run the reliability suite first\n"
        )
        return 1
    args.out.write_text(render(results))
    sys.stderr.write(f"write_report: {args.out} from {len(results)} scenario records\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
