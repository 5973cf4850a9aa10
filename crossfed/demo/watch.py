"""Follow a demo run through the Admin service: poll status and rounds, show a rich progress
bar, fetch each newly committed global model, and return the run's final state."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from crossfed.v1 import admin_pb2, admin_pb2_grpc

if TYPE_CHECKING:
    from crossfed.common.model.model_bundle import ModelBundle

TERMINAL = {"completed", "failed", "stopped"}
_MAX_MESSAGE = 8 * 1024 * 1024


class WatchError(RuntimeError):
    """The run could not be followed (server gone, timeout)."""


@dataclass
class AdminWatcher:
    """An authenticated Admin channel used by the demo."""

    channel: grpc.Channel
    stub: admin_pb2_grpc.AdminStub

    @classmethod
    def connect(
        cls, address: str, certs_dir: Path, client_cert: str, credential: Path
    ) -> AdminWatcher:
        """TLS channel with the admin certificate, every call signed with the admin credential."""
        from crossfed.common.crypto.certificates import Role
        from crossfed.common.crypto.grpc_credentials import channel_credentials
        from crossfed.common.crypto.identity import ClientCredential
        from crossfed.common.crypto.rpc_auth import authenticated_channel

        options = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE),
        ]
        raw = grpc.secure_channel(
            address, channel_credentials(certs_dir, client_cert, role=Role.ADMIN), options=options
        )
        channel = authenticated_channel(raw, ClientCredential.load(credential))
        return cls(channel=raw, stub=admin_pb2_grpc.AdminStub(channel))

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def export_model(self, round_no: int) -> ModelBundle:
        """The model bundle of committed round `round_no`, reassembled, digest-checked and
        loaded (the file `crossfed admin export-model` writes)."""
        from crossfed.common.model.model_bundle import MAX_BUNDLE_BYTES, BundleError, decode_bundle
        from crossfed.common.wire.chunk_stream import receive_payload
        from crossfed.common.wire.errors import WireError

        request = admin_pb2.ExportModelRequest(round=round_no)
        try:
            stream = self.stub.ExportModel(request, timeout=120)
            payload, _ = receive_payload(stream, MAX_BUNDLE_BYTES)
            return decode_bundle(payload, f"model bundle of round {round_no}")
        except grpc.RpcError as exc:
            raise WatchError(f"export of round {round_no} failed: {exc.details()}") from None
        except (WireError, BundleError) as exc:
            raise WatchError(f"export of round {round_no} is corrupt: {exc}") from None

    def follow(
        self,
        options: Any,
        supervisor: Any,
        on_commit: Callable[[int, int, float], None],
    ) -> str:
        """Poll until the run ends; call on_commit(round, uploads, seconds) once per committed
        round, in order. Returns the final run state."""
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        console = Console(stderr=True)
        deadline = time.monotonic() + options.timeout_s
        seen: set[int] = set()
        progress = Progress(
            TextColumn("[bold]federation[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            disable=not options.progress,
        )
        with progress:
            task = progress.add_task("starting", total=options.rounds)
            while True:
                if time.monotonic() > deadline:
                    raise WatchError(f"the run did not finish within {options.timeout_s:.0f} s")
                supervisor.check_alive()
                try:
                    status = self.stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
                    rounds = self.stub.ListRounds(admin_pb2.ListRoundsRequest(), timeout=10).rounds
                except grpc.RpcError as exc:
                    if exc.code() in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ):
                        time.sleep(0.5)
                        continue
                    raise WatchError(f"admin call failed: {exc.details()}") from None
                for info in sorted(rounds, key=lambda r: (r.round, r.attempt)):
                    if info.state == "committed" and info.round not in seen:
                        seen.add(info.round)
                        on_commit(
                            info.round, info.received, info.ended_unix_s - info.started_unix_s
                        )
                        progress.update(task, completed=len(seen))
                        if not options.progress:
                            console.print(f"round {info.round} committed: {info.received} uploads")
                open_rounds = [r for r in rounds if r.state == "open"]
                if open_rounds:
                    current = open_rounds[-1]
                    progress.update(
                        task,
                        description=f"round {current.round}: {current.received}/{current.selected} uploads",
                    )
                elif status.run_state not in TERMINAL:
                    progress.update(task, description=f"{status.run_state}: waiting for clients")
                if status.run_state in TERMINAL:
                    return str(status.run_state)
                time.sleep(0.3)
