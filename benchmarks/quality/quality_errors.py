"""Exceptions of the quality benchmark: each names the problem a user can fix."""

from __future__ import annotations


class QualityBenchmarkError(Exception):
    """Bad settings or inputs of the quality benchmark (message says which and why)."""
