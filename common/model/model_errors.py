"""Exceptions for model-side misuse: each message names the problem."""

from __future__ import annotations


class ModelError(ValueError):
    """Base class for model construction / input problems."""


class ModelInputError(ModelError):
    """Inputs to the network have the wrong shape, dtype or modality combination."""


class StateDictError(ModelError):
    """A (shareable) state dict does not match this network's keys or shapes."""


class StableDiffusionSetupError(ModelError):
    """The local Stable Diffusion checkpoint cannot be used for recovery (eq. 6)."""
