"""Global-model checkpoints, one safetensors file per committed round, written atomically
(tmp file, fsync, rename, fsync dir) so a kill at any instant leaves either the old or the
new file, never a torn one. Only the last N are kept, of the checkpoints and of the global
prototypes files published beside them (eq. 16)."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from crossfed.common import atomic_files
from crossfed.common.wire.errors import WireError
from crossfed.common.wire.tensor_codec import decode_tensors, payload_pieces
from crossfed.server.errors import CheckpointError

_NAME = re.compile(r"^global-(\d{6,})\.safetensors$")
#: The global prototypes published at a round's commit (eq. 16), beside its checkpoint.
PROTOTYPES_FILE_NAME = "prototypes-{:06d}.safetensors"
_PROTOTYPES_NAME = re.compile(r"^prototypes-(\d{6,})\.safetensors$")
#: The strategy's server-side state (optimizer moments) as of a round's commit.
STRATEGY_FILE_NAME = "strategy-{:06d}.safetensors"
_STRATEGY_NAME = re.compile(r"^strategy-(\d{6,})\.safetensors$")


class CheckpointStore:
    """Directory of ``global-<round>.safetensors`` files (round 0 = the initial model)."""

    def __init__(self, directory: Path, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise CheckpointError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_files.remove_stale_temps(self.directory)  # leftovers of a killed write

    def path_of(self, round_no: int) -> Path:
        """Where the checkpoint of ``round_no`` lives."""
        return self.directory / f"global-{round_no:06d}.safetensors"

    def rounds(self, pattern: re.Pattern[str] = _NAME) -> list[int]:
        """Rounds that have a checkpoint (or a file named by ``pattern``) on disk, ascending."""
        found = []
        for path in self.directory.iterdir():
            match = pattern.match(path.name)
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def prototypes_path(self, round_no: int) -> Path:
        """Where the global prototypes published at ``round_no``'s commit live."""
        return self.directory / PROTOTYPES_FILE_NAME.format(round_no)

    def strategy_state_path(self, round_no: int) -> Path:
        """Where the strategy state checkpointed with ``round_no``'s commit lives."""
        return self.directory / STRATEGY_FILE_NAME.format(round_no)

    def save_strategy_state(self, round_no: int, state: dict[str, torch.Tensor]) -> Path:
        """Write the strategy's state of ``round_no`` atomically (before the round's commit
        is recorded, like its checkpoint; pruned with it)."""
        path = self.strategy_state_path(round_no)
        atomic_files.write_atomic(path, payload_pieces(state, metadata={"round": str(round_no)}))
        return path

    def load_strategy_state(self, round_no: int) -> dict[str, torch.Tensor] | None:
        """The strategy state checkpointed with ``round_no`` (None: the strategy kept none)."""
        path = self.strategy_state_path(round_no)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return decode_tensors(data)
        except WireError as exc:
            raise CheckpointError(f"strategy state {path} is corrupt: {exc}") from exc

    def save(
        self, round_no: int, state: dict[str, torch.Tensor], run_id: str = "", prune: bool = True
    ) -> Path:
        """Write the global model of ``round_no`` atomically, then (``prune``) prune old
        checkpoints. A caller that records the commit elsewhere passes ``prune=False`` and
        prunes after its commit: until then the previous checkpoint is the committed one."""
        # written piece by piece from the tensors' memory: no model-sized payload at commit
        pieces = payload_pieces(state, metadata={"round": str(round_no), "run_id": run_id})
        path = self.path_of(round_no)
        atomic_files.write_atomic(path, pieces)
        if prune:
            self.prune(protect=round_no)
        return path

    def prune(self, protect: int) -> None:
        """Delete all but the newest ``keep_last`` checkpoints, prototypes and strategy files
        (never those of round ``protect``)."""
        for pattern, path_of in (
            (_NAME, self.path_of),
            (_PROTOTYPES_NAME, self.prototypes_path),
            (_STRATEGY_NAME, self.strategy_state_path),
        ):
            rounds = [r for r in self.rounds(pattern) if r <= protect]
            for old in rounds[: max(len(rounds) - self.keep_last, 0)]:
                if old != protect:
                    with contextlib.suppress(FileNotFoundError):
                        path_of(old).unlink()

    def load_bytes(self, round_no: int) -> bytes:
        """The raw safetensors bytes of a checkpoint (served as-is to downloaders)."""
        path = self.path_of(round_no)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise CheckpointError(
                f"checkpoint for round {round_no} not found at {path}; on disk: {self.rounds()}"
            ) from exc

    def load(self, round_no: int) -> dict[str, torch.Tensor]:
        """Decode a checkpoint (safetensors: no pickle)."""
        data = self.load_bytes(round_no)
        try:
            return decode_tensors(data)
        except WireError as exc:
            raise CheckpointError(f"checkpoint {self.path_of(round_no)} is corrupt: {exc}") from exc
