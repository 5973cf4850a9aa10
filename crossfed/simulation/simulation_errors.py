"""Exceptions of the simulator: each names the problem a user can fix."""

from __future__ import annotations


class SimulationError(Exception):
    """A simulation that cannot run or finish (bad experiment, data, cluster or round);
    ``str()`` is one line saying what and why."""


class RayMissingError(SimulationError):
    """The Ray backend was asked for but Ray is not installed."""
