"""What a client releases in the projection exchange (eq. 16): per-class projections of its
f_t and f_i, clipped and Gaussian-noised when projection DP is on, with the epsilon spent so
far tracked by an RDP accountant that survives daemon restarts (kept in the state dir)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from crossfed.common.config import PrivacyConfig
from crossfed.common.crypto.secure_files import write_public_file
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.network import CrossModalNet
from crossfed.common.model.prototypes import ClassPrototypes, compute_class_projections
from crossfed.common.privacy.budget import PrivacyBudget
from crossfed.common.privacy.privacy_accountant import PrivacyAccountant, PrivacyAccountantError
from crossfed.common.privacy.projection_dp import ProjectionDPParams, privatize_projections
from crossfed.common.wire.tensor_codec import encode_tensors

log = logging.getLogger(__name__)

ACCOUNTANT_FILE = "projection_accountant.json"


@dataclass(frozen=True)
class Release:
    """One projection payload and the epsilon spent once it is out."""

    payload: bytes  # safetensors: text_sum, image_sum, text_count, image_count
    epsilon_spent: float


def _privatized(prototypes: ClassPrototypes, params: ProjectionDPParams) -> ClassPrototypes:
    """Noised per-class *means* with presence weights.

    Sums grow with the sample count, so clipping them to C would destroy them; means have
    norm <= 1 for our normalized embeddings and clipping them to C keeps their direction.
    The released count is 1 for a class the client holds (0 otherwise), so the server's
    sum/count averages the clients' noised means. A modality the client lacks stays zero
    (the server knows it from Register; there is nothing to hide there).
    """
    text_mean, image_mean = prototypes.means()
    text_present = (prototypes.text_count >= 1).to(torch.float32)
    image_present = (prototypes.image_count >= 1).to(torch.float32)
    text = privatize_projections(text_mean, params) if bool(text_present.any()) else text_mean
    image = privatize_projections(image_mean, params) if bool(image_present.any()) else image_mean
    # Rows of absent classes carry noise too (hides which classes exist) but weigh 0.
    return ClassPrototypes(
        text_sum=text * text_present[:, None],
        image_sum=image * image_present[:, None],
        text_count=text_present,
        image_count=image_present,
    )


class ProjectionReleaser:
    """Computes, privatizes and accounts one client's projection releases."""

    def __init__(self, privacy: PrivacyConfig, state_dir: Path | None) -> None:
        self.privacy = privacy
        self._path = Path(state_dir) / ACCOUNTANT_FILE if state_dir is not None else None
        self.accountant = self._load()
        self._budget_warned = False

    def _load(self) -> PrivacyAccountant:
        if self._path is None or not self._path.exists():
            return PrivacyAccountant()
        try:
            return PrivacyAccountant.from_json(self._path.read_text("utf-8"))
        except (OSError, PrivacyAccountantError) as exc:
            # Starting from zero would under-report epsilon: refuse instead.
            raise PrivacyAccountantError(f"cannot read {self._path}: {exc}") from exc

    def _save(self) -> None:
        if self._path is not None:
            write_public_file(self._path, self.accountant.to_json().encode("utf-8"))

    @property
    def params(self) -> ProjectionDPParams:
        """C and sigma from the privacy config."""
        return ProjectionDPParams(self.privacy.clip, self.privacy.noise_multiplier)

    def epsilon(self) -> float:
        """Epsilon spent by the releases so far, at the configured delta."""
        return self.accountant.epsilon(self.privacy.delta)

    def spend(self, noise_multiplier: float, what: str) -> bool:
        """Account one more Gaussian release at sample rate 1 (e.g. the calibration
        statistics); False, with nothing spent, when it would pass the epsilon budget."""
        if self.privacy.epsilon_budget is not None:
            budget = PrivacyBudget(self.privacy.epsilon_budget, self.privacy.delta)
            if self.accountant.would_exceed(budget, noise_multiplier, 1.0):
                log.warning(
                    "%s not released: epsilon budget %.3g (spent %.3g)",
                    what,
                    budget.epsilon,
                    self.epsilon(),
                )
                return False
        self.accountant.step(noise_multiplier, 1.0)
        self._save()
        return True

    def release(self, model: CrossModalNet, data: EmbeddingSet) -> Release | None:
        """The next projection payload, or None when the epsilon budget would be exceeded."""
        prototypes = compute_class_projections(model, data)
        if not self.privacy.projection_dp:
            log.warning("projection DP is off: exact per-class sums leave this client")
            return Release(encode_tensors(prototypes.to_tensors()), 0.0)
        params = self.params
        sigma = params.accounting_noise_multiplier
        if self.privacy.epsilon_budget is not None and sigma > 0:
            budget = PrivacyBudget(self.privacy.epsilon_budget, self.privacy.delta)
            if self.accountant.would_exceed(budget, sigma, 1.0):
                if not self._budget_warned:
                    log.warning(
                        "projection epsilon budget %.3g reached (spent %.3g): no more releases",
                        budget.epsilon,
                        self.epsilon(),
                    )
                    self._budget_warned = True
                return None
        noised = _privatized(prototypes, params)
        if sigma > 0:
            self.accountant.step(sigma, 1.0)
            self._save()
        spent = self.epsilon() if sigma > 0 else math.inf
        return Release(encode_tensors(noised.to_tensors()), spent)
