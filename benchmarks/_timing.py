"""Shared timing helper of the benchmark scripts."""
from __future__ import annotations

import statistics
import time


def bench(cases: dict, repeats: int) -> dict:
    """Median seconds per case, cases interleaved so load drifts hit all."""
    for fn in cases.values():  # warm-up
        fn()
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}
