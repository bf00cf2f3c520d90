"""Shared timing helper of the benchmark scripts: the engine's ``median_seconds``."""
from __future__ import annotations

from flowjac.engine.jvp import median_seconds


def bench(cases: dict, repeats: int) -> dict:
    """Median seconds per case, cases interleaved so load drifts hit all."""
    return median_seconds(cases, repeats)
