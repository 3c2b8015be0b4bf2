"""The benchmarks' one timing rule: the median of repeated calls, after warm-up."""

from __future__ import annotations

import statistics
import time


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones.

    ``fn`` may return its own time in seconds (a float), e.g. to leave out
    setup it has to redo on every call; otherwise the whole call is timed.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        own = fn()
        times.append(own if isinstance(own, float) else time.perf_counter() - start)
    return statistics.median(times)
