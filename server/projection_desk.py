"""The server's side of the projection exchange (eq. 16): each client's release is decoded,
bounded and admitted (privacy mandate, noise, epsilon budget: counted before use), then summed
until the next commit publishes the sums as global prototypes beside the round's checkpoint.
Not locked itself: the projection intake (server/projection_intake.py), which decides which
round a release belongs to, calls it under the board's lock (admission, which only touches the
privacy ledger, runs outside)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from crossfed.common import atomic_files
from crossfed.common.privacy.projection_dp import ProjectionDPParams
from crossfed.server.checkpoints import CheckpointStore
from crossfed.server.errors import InvalidUpdateError
from crossfed.server.projection_exchange import (
    ProjectionAggregator,
    ProjectionNoiseHook,
    ProjectionSpec,
    bound_projections,
    decode_projections,
    prototypes_payload,
)
from crossfed.server.projection_privacy import ProjectionPrivacy


@dataclass(frozen=True)
class ProjectionReply:
    """What ExchangeProjections answers: the latest global prototypes (round 0 and no bytes
    before the first) and the caller's epsilon as the server counts it, with its budget."""

    prototypes_round: int
    prototypes: bytes
    epsilon_spent: float
    epsilon_budget: float


@dataclass(frozen=True)
class AdmittedRelease:
    """One client's projections after bounding and admission."""

    projections: dict[str, torch.Tensor]
    clipped_rows: int
    epsilon: float  # the client's epsilon as the server counts it, this release included


class ProjectionDesk:
    """Pending projection sums and the latest published global prototypes."""

    def __init__(
        self,
        spec: ProjectionSpec | None,
        privacy: ProjectionPrivacy,
        noise_hook: ProjectionNoiseHook | None = None,
    ) -> None:
        self.spec = spec
        self.privacy = privacy
        self.noise_hook = noise_hook
        self._pending = ProjectionAggregator(spec) if spec is not None else None
        self.published: tuple[int, bytes] | None = None

    def load_published(self, checkpoints: CheckpointStore, last_round: int) -> None:
        """After a restart: the newest prototypes file at or before ``last_round``."""
        for round_no in range(last_round, 0, -1):
            path = checkpoints.prototypes_path(round_no)
            if path.exists():
                self.published = (round_no, path.read_bytes())
                return

    def decode(self, payload: bytes) -> dict[str, torch.Tensor]:
        """A release's tensors, checked against the projection spec."""
        if self.spec is None:
            raise InvalidUpdateError("this server is not configured for projection exchange")
        return decode_projections(payload, self.spec)

    def is_fresh(self, client_id: str, round_no: int) -> bool:
        """Whether ``client_id`` has no release for ``round_no`` pending yet."""
        return self._pending is not None and not self._pending.has(client_id, round_no)

    def admit(
        self,
        client_id: str,
        projections: dict[str, torch.Tensor],
        registered: int,
        mechanism: ProjectionDPParams | None,
        epsilon_budget: float,
    ) -> AdmittedRelease:
        """Bound the rows, then admit against the mandate and the budget (ServerError if
        refused); the epsilon is counted here, before the release is used."""
        bounded, clipped = bound_projections(projections, self.privacy.limits(registered))
        spent = self.privacy.admit_projections(client_id, mechanism, bounded, epsilon_budget)
        return AdmittedRelease(bounded, clipped, spent.epsilon)

    def add(self, client_id: str, round_no: int, release: AdmittedRelease) -> bool:
        """Add an admitted release to the pending sums; False for a repeat."""
        assert self._pending is not None
        return self._pending.add(client_id, round_no, release.projections)

    def publish(self, round_no: int, checkpoints: CheckpointStore) -> tuple[int, bytes] | None:
        """Write the pending sums (noised by the hook, if any) as round ``round_no``'s global
        prototypes; None when nobody sent any. OSError when the disk refuses. They become the
        published ones only with `adopt`, once the commit is recorded."""
        pending = self._pending
        if pending is None or not pending.contributors:
            return None
        sums = pending.sums()
        if self.noise_hook is not None:
            sums = self.noise_hook(sums, round_no)
        payload = prototypes_payload(sums)
        atomic_files.write_atomic(checkpoints.prototypes_path(round_no), payload)
        return round_no, payload

    def adopt(self, published: tuple[int, bytes]) -> None:
        """The commit that published these prototypes is recorded: serve them, start over."""
        self.published = published
        assert self.spec is not None
        self._pending = ProjectionAggregator(self.spec)

    def reply(self, client_id: str, epsilon_budget: float) -> ProjectionReply:
        """The latest published prototypes and ``client_id``'s epsilon with its budget."""
        prototypes_round, prototypes = self.published or (0, b"")
        return ProjectionReply(
            prototypes_round,
            prototypes,
            self.privacy.ledger.epsilon(client_id),
            epsilon_budget,
        )
