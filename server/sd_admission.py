"""Which text->image recovery a registering client runs in a `stable-diffusion` run (eq. 6-7),
decided at registration from the checkpoint digest it declares, so a client that cannot take
part is refused with one line before any round, not mid-round."""

from __future__ import annotations

from dataclasses import dataclass

from crossfed.common.model.model_config import ModelConfig
from crossfed.server.errors import ModelMismatchError

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
