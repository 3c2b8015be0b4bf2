"""Run a function on several spawned processes, each a rank of one gloo process group (tests and benchmarks).

``run_ranks(worker, world, *args)`` starts ``world`` processes (the ``spawn``
method: nothing of the parent's state is shared), each joins a gloo group
through a file store in a fresh temporary directory (no port to collide on),
with ``group_timeout`` seconds on every collective, calls
``worker(rank, world, *args)`` and sends back its picklable result. The
parent waits at most ``timeout`` seconds in all, then kills whatever is left:
no process outlives the call. A rank that raised, or did not answer, makes it
raise ``RuntimeError`` with that rank's traceback. ``run_ranks_once`` keeps
each ``(worker, world)``'s results, so that many tests can read one spawned
group's measurements.
"""

from __future__ import annotations

import datetime
import functools
import os
import queue as queues
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(worker, world: int, *args, timeout: float = 300.0, group_timeout: float = 60.0,
              threads: int = 1) -> list:
    """``[worker(rank, world, *args) for rank in range(world)]``, each on its own process and rank."""
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="seqpar-ranks-") as directory:
        results = context.Queue()
        store = os.path.join(directory, "store")
        processes = [
            context.Process(target=_rank_main, args=(worker, rank, world, store, group_timeout, threads, results, args),
                            daemon=True)
            for rank in range(world)
        ]
        for process in processes:
            process.start()
        answers = {}
        deadline = time.monotonic() + timeout
        try:
            while len(answers) < world and time.monotonic() < deadline:
                try:
                    rank, ok, value = results.get(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
                    answers[rank] = (ok, value)
                except queues.Empty:
                    if all(not process.is_alive() for process in processes) and results.empty():
                        break
        finally:
            for process in processes:
                process.join(timeout=5)
            for process in processes:
                if process.is_alive():
                    process.kill()
                    process.join()
    failed = {rank: answers[rank][1] for rank in answers if not answers[rank][0]}
    silent = [rank for rank in range(world) if rank not in answers]
    if failed or silent:
        text = "".join(f"\n--- rank {rank} ---\n{trace}" for rank, trace in sorted(failed.items()))
        if silent:
            text += f"\nranks {silent} did not answer within {timeout:.0f} s"
        raise RuntimeError(f"run_ranks: {len(failed) + len(silent)} of {world} ranks failed:{text}")
    return [answers[rank][1] for rank in range(world)]


@functools.cache
def run_ranks_once(worker, world: int) -> list:
    """:func:`run_ranks` of ``worker`` on ``world`` ranks, run at the first call and kept."""
    return run_ranks(worker, world)


def _rank_main(worker, rank, world, store, group_timeout, threads, results, args):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=group_timeout))
    try:
        results.put((rank, True, worker(rank, world, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()
