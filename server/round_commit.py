"""The heavy half of a round's commit, run on the committer thread without the engine's lock:
the aggregator's result, the strategy's step, validation, and the fsynced checkpoint and
strategy state. The engine then records the commit (database, memory) under its lock, and
calls `after_commit` (pruning, the model bundle) once the lock is released."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from crossfed.server.checkpoints import CheckpointStore
from crossfed.server.errors import InvalidUpdateError, StateStoreError
from crossfed.server.model_bundles import BundleStore
from crossfed.server.strategies.base import RoundAggregator, Strategy
from crossfed.server.update_validation import TensorSlot, validate_update

log = logging.getLogger(__name__)


@dataclass
class PreparedCommit:
    """A new global model on disk, ready to be recorded; or why it is not (``refused``:
    the event kind, ``message``: what the round's failure says)."""

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)
    refused: str = ""
    message: str = ""


class RoundCommitter:
    """Turns a closed round's aggregate into a checkpointed global model with ``strategy``."""

    def __init__(
        self,
        strategy: Strategy,
        checkpoints: CheckpointStore,
        spec: Mapping[str, TensorSlot],
    ) -> None:
        self.strategy = strategy
        self.checkpoints = checkpoints
        self.spec = spec

    def load_state(self, round_no: int) -> None:
        """The strategy's state as checkpointed with ``round_no`` (none on disk: fresh). Also
        the rollback after a failed commit: its step on the failed aggregate must not count."""
        self.strategy.load_state_dict(self.checkpoints.load_strategy_state(round_no) or {})

    def prepare_training(
        self,
        round_no: int,
        run_id: str,
        global_state: Mapping[str, torch.Tensor],
        aggregator: RoundAggregator,
    ) -> PreparedCommit:
        """Aggregate, step, validate (an overflowing sum is never committed) and write."""
        aggregate = aggregator.result()
        new_state = self.strategy.finish_round(global_state, aggregate)
        try:
            validate_update(new_state, self.spec, what=f"aggregate of round {round_no}")
        except InvalidUpdateError as exc:
            return PreparedCommit(
                refused="aggregate_rejected",
                message=f"{exc}; the round is not committed, the last good model is kept",
            )
        prepared = self.write(round_no, run_id, new_state, self.strategy.state_dict())
        prepared.values = dict(aggregate.values)
        return prepared

    def write(
        self,
        round_no: int,
        run_id: str,
        state: dict[str, torch.Tensor],
        strategy_state: dict[str, torch.Tensor] | None = None,
    ) -> PreparedCommit:
        """Checkpoint ``state`` (and the strategy's state) atomically, unpruned: until the
        database records the commit, the previous checkpoint is the committed one."""
        try:
            self.checkpoints.save(round_no, state, run_id, prune=False)
            if strategy_state:
                self.checkpoints.save_strategy_state(round_no, strategy_state)
        except OSError as exc:  # disk full, read-only state dir, ...
            return PreparedCommit(
                refused="checkpoint_failed",
                message=f"checkpoint of round {round_no} could not be written "
                f"({exc.strerror or exc}); the round is not committed, the last good "
                "checkpoint is kept",
            )
        return PreparedCommit(state=state)

    def after_commit(
        self,
        round_no: int,
        state: dict[str, torch.Tensor],
        bundles: BundleStore | None,
        report: Callable[[str], None],
    ) -> None:
        """Prune old files; write the round's model bundle (the commit stands if the disk
        refuses it: ``report`` gets the message, export-model builds it from the checkpoint)."""
        self.checkpoints.prune(protect=round_no)
        if bundles is None:
            return
        try:
            bundles.write(round_no, state)
        except (OSError, StateStoreError) as exc:
            message = (
                f"model bundle of round {round_no} not written ({exc}); the round is "
                "committed, export-model builds its bundle from the checkpoint"
            )
            log.error(message)
            report(message)
