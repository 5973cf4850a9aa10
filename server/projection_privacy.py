"""Privacy is accounted where it is enforced: the server mandates the projection noise
(eq. 16; sigma and the clip C, announced at Register), refuses releases that do not carry it,
and computes each client's epsilon itself from the mandate and the releases it received
(`PrivacyLedger`), never from the epsilon a client reports. A release that would take a
client past the epsilon budget is refused: that client's projection exchange ends, its
training goes on.

Checks on one projection release, in order: the declared mechanism (clip no wider, noise no
smaller than mandated: an honest daemon adopts the mandate), the noise actually present in the
rows (a chi-square test with a 1e-9 false-refusal rate: exact means claiming noise fail it),
then the budget. Calibration statistics are checked and counted the same way (one release of
the calibration mechanism, whose noise multiplier is sigma itself).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from crossfed.common.privacy.calibration_dp import NOISE_METRIC
from crossfed.common.privacy.projection_dp import (
    ProjectionDPParams,
    ProjectionMandate,
    noise_present,
    released_modalities,
)
from crossfed.server.errors import (
    InvalidUpdateError,
    PrivacyBudgetExceededError,
    PrivacyMandateError,
)
from crossfed.server.privacy_ledger import PrivacyLedger
from crossfed.server.projection_exchange import ProjectionLimits


@dataclass(frozen=True)
class Spent:
    """A client's epsilon after a counted release, and the budget it is held to (0: none)."""

    epsilon: float
    budget: float


class ProjectionPrivacy:
    """The server's projection-DP gate: a mandate (None: exact projections are taken and no
    epsilon is accounted) and the ledger of what each client released."""

    def __init__(
        self, mandate: ProjectionMandate | None, ledger: PrivacyLedger, clip_norm: float = 1.0
    ) -> None:
        self.mandate = mandate
        self.ledger = ledger
        self.clip_norm = mandate.clip_norm if mandate is not None else clip_norm

    def limits(self, registered_rows: int) -> ProjectionLimits:
        """How large a release of a client with ``registered_rows`` may be: under the mandate
        noised class means with presence counts (0 or 1); else exact per-class sums whose
        means are embeddings' means (norm <= C)."""
        if self.mandate is None:
            return ProjectionLimits(self.clip_norm, 0.0, float(registered_rows), registered_rows)
        return ProjectionLimits(self.clip_norm, self.mandate.params.noise_std, 1.0, registered_rows)

    def admit_projections(
        self,
        client_id: str,
        declared: ProjectionDPParams | None,
        projections: Mapping[str, torch.Tensor],
        budget: float,
    ) -> Spent:
        """Check and count one bounded projection release (see module docstring)."""
        mandate = self.mandate
        if mandate is None:
            return Spent(0.0, 0.0)
        self._check_declared(client_id, declared, "projections")
        for side in ("text", "image"):
            present = projections[f"{side}_count"] > 0
            rows = projections[f"{side}_sum"][present]
            if not noise_present(rows, mandate.params.noise_std):
                raise InvalidUpdateError(
                    f"the {side} projections of {client_id!r} carry far less noise than the "
                    f"declared sigma (their spread is below the mandated std "
                    f"{mandate.params.noise_std:g}); they were not used"
                )
        steps = released_modalities(projections["text_count"], projections["image_count"])
        if steps == 0:
            return Spent(self.ledger.epsilon(client_id), budget)
        return self._count(
            client_id, mandate.params.accounting_noise_multiplier, steps, budget, "projections"
        )

    def admit_calibration(
        self, client_id: str, metrics: Mapping[str, float], num_rows: int, budget: float
    ) -> Spent:
        """Check and count a calibration-statistics release (none when ``num_rows`` is 0)."""
        mandate = self.mandate
        if mandate is None or num_rows == 0:
            return Spent(self.ledger.epsilon(client_id), budget)
        declared = float(metrics.get(NOISE_METRIC, 0.0))
        if not declared >= mandate.noise_multiplier:
            raise PrivacyMandateError(
                f"this server mandates calibration noise multiplier >= "
                f"{mandate.noise_multiplier:g}; client {client_id!r} declared {declared:g} "
                f"({NOISE_METRIC}): its statistics were not used"
            )
        return self._count(client_id, mandate.noise_multiplier, 1, budget, "calibration statistics")

    def _check_declared(
        self, client_id: str, declared: ProjectionDPParams | None, what: str
    ) -> None:
        assert self.mandate is not None
        if declared is None or not self.mandate.satisfied_by(declared):
            got = (
                "no noise"
                if declared is None or declared.noise_multiplier == 0
                else f"sigma {declared.noise_multiplier:g} with clip {declared.clip_norm:g}"
            )
            raise PrivacyMandateError(
                f"this server mandates projection DP: rows clipped to <= "
                f"{self.mandate.clip_norm:g} and noise sigma >= "
                f"{self.mandate.noise_multiplier:g}; client {client_id!r} declared {got}, so "
                f"its {what} were refused (turn projection DP on, or upgrade the client)"
            )

    def _count(
        self, client_id: str, noise_multiplier: float, steps: int, budget: float, what: str
    ) -> Spent:
        after = self.ledger.epsilon_after(client_id, noise_multiplier, steps)
        if budget > 0 and after > budget:
            spent = self.ledger.epsilon(client_id)
            raise PrivacyBudgetExceededError(
                f"client {client_id!r} has spent epsilon {spent:.3f} of its budget "
                f"{budget:g} (delta {self.ledger.delta:g}, counted by the server); these "
                f"{what} would take it to {after:.3f}, so they were refused: its projection "
                "exchange ends here, its training goes on"
            )
        return Spent(self.ledger.record(client_id, noise_multiplier, steps), budget)
