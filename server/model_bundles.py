"""The server's model bundles (common/model/model_bundle.py): one per committed round, written
beside its checkpoint, and the one `crossfed admin export-model` streams. A bundle joins what
the server keeps apart: the checkpoint's weights, the global prototypes last published at or
before the round, the federation's class list and pinned encoders, and the run's epsilon."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from crossfed.common import atomic_files
from crossfed.common.model.model_bundle import ModelBundle
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.prototypes import ClassPrototypes
from crossfed.common.wire.errors import WireError
from crossfed.common.wire.tensor_codec import decode_tensors
from crossfed.server.checkpoints import CheckpointStore
from crossfed.server.errors import CheckpointError
from crossfed.server.federation_contract import FederationContract
from crossfed.server.state.records import RunRecord

BUNDLE_FILE_NAME = "bundle-{:06d}.safetensors"
_BUNDLE_NAME = re.compile(r"^bundle-(\d{6,})\.safetensors$")


class BundleStore:
    """Builds bundles from a CheckpointStore's files and keeps one per retained checkpoint."""

    def __init__(
        self,
        checkpoints: CheckpointStore,
        model_config: ModelConfig,
        contract: FederationContract,
        delta: float,
        run: Callable[[], RunRecord],
    ) -> None:
        self.checkpoints = checkpoints
        self.model_config = model_config
        self.contract = contract
        self.delta = delta
        self._run = run

    @property
    def directory(self) -> Path:
        return self.checkpoints.directory

    def path_of(self, round_no: int) -> Path:
        return self.directory / BUNDLE_FILE_NAME.format(round_no)

    def prototypes_at(self, round_no: int) -> ClassPrototypes | None:
        """The global prototypes a client holds after ``round_no``: the latest published at
        or before it (rounds without projections, and the calibration round, publish none)."""
        for rnd in range(round_no, 0, -1):
            path = self.checkpoints.prototypes_path(rnd)
            if path.is_file():
                try:
                    return ClassPrototypes.from_tensors(decode_tensors(path.read_bytes()))
                except (WireError, ValueError, OSError) as exc:
                    raise CheckpointError(f"prototypes file {path} is unreadable: {exc}") from exc
        return None

    def build(self, round_no: int, state: Mapping[str, torch.Tensor] | None = None) -> ModelBundle:
        """The bundle of a committed round: ``state``, or its checkpoint (CheckpointError if
        gone)."""
        run = self._run()
        return ModelBundle(
            state=dict(state) if state is not None else self.checkpoints.load(round_no),
            model_config=self.model_config,
            class_names=self.contract.class_names,
            text_encoder=self.contract.encoder("text"),
            image_encoder=self.contract.encoder("image"),
            prototypes=self.prototypes_at(round_no),
            round=round_no,
            run_id=run.run_id,
            epsilon=run.epsilon_spent,
            delta=self.delta if run.epsilon_spent > 0 else 0.0,
        )

    def write(self, round_no: int, state: Mapping[str, torch.Tensor] | None = None) -> Path:
        """Build and write the bundle of ``round_no`` atomically; prune bundles whose
        checkpoint is gone. OSError when the disk refuses."""
        path = self.path_of(round_no)
        atomic_files.write_atomic(path, self.build(round_no, state).pieces())
        kept = set(self.checkpoints.rounds())
        for old in self.directory.iterdir():
            match = _BUNDLE_NAME.match(old.name)
            if match and int(match.group(1)) not in kept:
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()
        return path

    def read(self, round_no: int) -> bytes:
        """The bundle bytes of a committed round: its file, or built now (round 0, a round
        whose bundle write failed, a state directory from an older server)."""
        path = self.path_of(round_no)
        if path.is_file():
            return path.read_bytes()
        return self.build(round_no).encode()
