"""Which text->image recovery a registering client runs in a `stable-diffusion` run (eq. 6-7),
decided at registration from the checkpoint digest it declares, so a client that cannot take
part is refused with one line before any round, not mid-round; and the upload check that a
client admitted with feature recovery gives the SD deltas no weight in FedAvg."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.sd_trainable import SD_MODULE
from crossfed.server.errors import InvalidUpdateError, ModelMismatchError

RECOVERY_SD = "stable-diffusion"
RECOVERY_FEATURE = "feature"


@dataclass(frozen=True)
class SDRequirement:
    """The run's base checkpoint and what happens to a client without it."""

    checkpoint_digest: str
    refuse_without: bool

    @classmethod
    def of(cls, config: ModelConfig) -> SDRequirement | None:
        """The requirement of a stable-diffusion run, None for feature recovery."""
        sd = config.stable_diffusion
        if sd is None:
            return None
        return cls(sd.checkpoint_digest, sd.clients_without_checkpoint == "refuse")


def client_recovery(requirement: SDRequirement | None, declared_digest: str) -> str:
    """'stable-diffusion' when the client runs SD recovery in this run, 'feature' when it
    keeps feature-space recovery; ModelMismatchError when the run cannot admit it."""
    if requirement is None:
        return RECOVERY_FEATURE  # a client's checkpoint goes unused in a feature run
    want = requirement.checkpoint_digest
    if declared_digest and declared_digest != want:
        raise ModelMismatchError(
            f"this run recovers images with Stable Diffusion checkpoint {want[:12]}...; the "
            f"client's checkpoint is {declared_digest[:12]}... (another checkpoint or a "
            "modified copy): give it the run's checkpoint"
        )
    if declared_digest:
        return RECOVERY_SD
    if requirement.refuse_without:
        raise ModelMismatchError(
            f"this run recovers images with Stable Diffusion checkpoint {want[:12]}... and "
            "this client has none (or no GPU with --sd-device auto): start it with "
            "--sd-checkpoint DIR, or let such clients join with feature recovery "
            "(model.stable_diffusion.clients_without_checkpoint: feature)"
        )
    return RECOVERY_FEATURE


def check_sd_weight(client_id: str, recovery: str | None, weights: Mapping[str, float]) -> None:
    """InvalidUpdateError when a client registered with feature recovery would weigh in on
    the SD deltas (it holds no checkpoint: its copy is the untouched global one). Unknown
    recovery (registered before a server restart) is not checked."""
    weight = weights.get(SD_MODULE, 0.0)
    if weight > 0 and recovery == RECOVERY_FEATURE:
        raise InvalidUpdateError(
            f"client {client_id!r} registered without the Stable Diffusion checkpoint but "
            f"gives {SD_MODULE} weight {weight:g}"
        )
