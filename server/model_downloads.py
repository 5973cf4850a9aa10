"""Which global model a client downloads for a round: round r trains from the model committed
with round r-1 (round 0 asks for the latest). Downloads stream the checkpoint file; the
serialized latest model is cached on the board for callers that want bytes."""

from __future__ import annotations

from pathlib import Path

from crossfed.server.checkpoints import CheckpointStore
from crossfed.server.errors import CheckpointError, WrongRoundError
from crossfed.server.round_board import RoundBoard


class ModelDownloads:
    """Serves the input model of a round from the checkpoints."""

    def __init__(self, board: RoundBoard, checkpoints: CheckpointStore) -> None:
        self.board = board
        self.checkpoints = checkpoints

    def _version_for(self, round_no: int) -> tuple[int, int]:
        """(version, last committed) for ``round_no``; call under the board's lock."""
        last = self.board.run.last_committed_round
        version = last if round_no == 0 else round_no - 1
        if version > last:
            raise WrongRoundError(
                f"round {round_no} has not started; the latest committed round is {last}"
            )
        return version, last

    def model_bytes(self, round_no: int) -> tuple[int, bytes]:
        """(version, safetensors bytes) of the model round ``round_no`` trains from."""
        board = self.board
        with board.lock:
            version, last = self._version_for(round_no)
            if version == last:
                if board.global_bytes is None:
                    board.global_bytes = self.checkpoints.load_bytes(last)
                return version, board.global_bytes
        try:
            return version, self.checkpoints.load_bytes(version)
        except CheckpointError as exc:
            raise WrongRoundError(
                f"the input model of round {round_no} is no longer kept: {exc}"
            ) from exc

    def model_file(self, round_no: int) -> tuple[int, Path]:
        """(version, checkpoint file) of the model round ``round_no`` trains from; streamed
        chunk by chunk instead of holding a serialized copy for the whole round."""
        with self.board.lock:
            version, _ = self._version_for(round_no)
        path = self.checkpoints.path_of(version)
        if not path.is_file():
            raise WrongRoundError(
                f"the input model of round {round_no} is no longer kept (no {path.name})"
            )
        return version, path
