"""The evaluation's error type."""

from __future__ import annotations


class EvaluationError(RuntimeError):
    """The evaluation cannot run: no split, an unreachable endpoint, a bad output dir."""
