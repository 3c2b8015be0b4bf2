"""The benchmarks' one timing rule: the median of repeated calls, after warm-up."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch


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


def interleaved_medians(fns: dict, repeats: int, budget: float = 2e-3, warmup: int = 2) -> dict:
    """Median seconds per call of each ``fns[name]()``, timed in turns: round ``r`` times every function once.

    Each turn runs a function ``k`` times in a row (``k`` such that a turn
    lasts about ``budget`` seconds, found in the warm-up) and records the mean;
    interleaving makes load that comes and goes fall on every function alike.
    """
    counts = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        fn()
        counts[name] = max(1, int(budget / max(time.perf_counter() - start, 1e-7)))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(counts[name]):
                fn()
            times[name].append((time.perf_counter() - start) / counts[name])
    return {name: statistics.median(values) for name, values in times.items()}


def past_trials(fn, backend, at_most: int = 40) -> int:
    """Call ``fn()`` until no graph it calls has a speed trial running in ``backend`` (a
    :class:`seqpar.backend.SeqparBackend`), at least once (the first call compiles) and at most ``at_most`` times;
    the number of calls. After it, seqpar runs the form it kept (a fused loop's own trials run before the graph's
    and delay it: a fixed number of warm-up calls, such as ``seqpar.speed.DECIDED_AFTER``, can end inside the
    trial). A graph ``fn`` does not call (a no-grad forward compiled before a training step) does not count: its
    trial never ends."""
    for calls in range(1, at_most + 1):
        before = [record.calls for record in backend.graphs]
        fn()
        called = [record for index, record in enumerate(backend.graphs)
                  if index >= len(before) or record.calls != before[index]]
        if not any(record.speed is not None and record.speed.kept is None for record in called):
            return calls
    return at_most


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages, for the lines before and after a run."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def machine_line(threads: int, dtype: str = "float32") -> str:
    """What a run's numbers were measured on: torch, processor, cores, threads, dtype and the load before it."""
    return (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{threads} thread{'s' if threads != 1 else ''}, {dtype}; load average before: {load_average()}")


def start_run(threads: int, seed: int = 0) -> None:
    """Set the threads and the seed of a run and print :func:`machine_line` with a blank line after it."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    print(machine_line(threads) + "\n")
