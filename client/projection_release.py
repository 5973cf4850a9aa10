"""What a client releases in the projection exchange (eq. 16): per-class projections of its
f_t and f_i, clipped and Gaussian-noised when projection DP is on, with the epsilon spent so
far tracked by an RDP accountant that survives daemon restarts (kept in the state dir).

A server's mandate (announced at Register) overrides the local settings where it is stricter:
projection DP on, its clip, at least its noise, at most its budget, its delta. The client then
counts its releases as the server does (one Gaussian release per modality present), so it
stops before the server would refuse it."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from crossfed.common.config import ClientPrivacyConfig
from crossfed.common.crypto.secure_files import write_public_file
from crossfed.common.data.embeddings import EmbeddingSet
from crossfed.common.model.network import CrossModalNet
from crossfed.common.model.prototypes import ClassPrototypes, compute_class_projections
from crossfed.common.privacy.budget import PrivacyBudget
from crossfed.common.privacy.privacy_accountant import PrivacyAccountant, PrivacyAccountantError
from crossfed.common.privacy.projection_dp import (
    ProjectionDPParams,
    ProjectionMandate,
    privatize_projections,
    released_modalities,
)
from crossfed.common.wire.tensor_codec import encode_tensors

log = logging.getLogger(__name__)

ACCOUNTANT_FILE = "projection_accountant.json"


@dataclass(frozen=True)
class Release:
    """One projection payload, the epsilon spent once it is out, and the mechanism applied."""

    payload: bytes  # safetensors: text_sum, image_sum, text_count, image_count
    epsilon_spent: float
    mechanism: ProjectionDPParams | None = None  # None: exact projections


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

    def __init__(self, privacy: ClientPrivacyConfig, state_dir: Path | None) -> None:
        self.own = privacy
        self.privacy = privacy  # the settings in force: own, tightened by a server mandate
        self._path = Path(state_dir) / ACCOUNTANT_FILE if state_dir is not None else None
        self.accountant = self._load()
        self._budget_warned = False

    def adopt(self, mandate: ProjectionMandate | None) -> None:
        """Apply a server's projection-privacy mandate (None: the own settings stand)."""
        own = self.own
        if mandate is None:
            self.privacy = own
            return
        budgets = [b for b in (own.epsilon_budget, mandate.epsilon_budget) if b is not None]
        effective = own.model_copy(
            update={
                "projection_dp": True,
                "clip": mandate.clip_norm,
                "noise_multiplier": max(own.noise_multiplier, mandate.noise_multiplier),
                "delta": mandate.delta,
                "epsilon_budget": min(budgets) if budgets else None,
            }
        )
        if not own.projection_dp or own.noise_multiplier < mandate.noise_multiplier:
            log.warning(
                "the server mandates projection noise sigma >= %g (clip %g); releasing with "
                "sigma %g instead of the local setting",
                mandate.noise_multiplier,
                mandate.clip_norm,
                effective.noise_multiplier,
            )
        self.privacy = effective

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
        steps = released_modalities(prototypes.text_count, prototypes.image_count)
        if self.privacy.epsilon_budget is not None and sigma > 0 and steps:
            budget = PrivacyBudget(self.privacy.epsilon_budget, self.privacy.delta)
            if self.accountant.would_exceed(budget, sigma, 1.0, steps):
                if not self._budget_warned:
                    log.warning(
                        "projection epsilon budget %.3g reached (spent %.3g): no more releases",
                        budget.epsilon,
                        self.epsilon(),
                    )
                    self._budget_warned = True
                return None
        noised = _privatized(prototypes, params)
        if sigma > 0 and steps:
            self.accountant.step(sigma, 1.0, steps)
            self._save()
        spent = self.epsilon() if sigma > 0 else math.inf
        return Release(encode_tensors(noised.to_tensors()), spent, params)
