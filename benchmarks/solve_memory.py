"""The peak memory of a parallel solve against its Jacobian blocks, whole chain or bounded by the device's memory.

    .venv/bin/python benchmarks/solve_memory.py --L 4096 --shapes 4x64 16x32

``seqpar.runtime.budget`` bounds one batched evaluation's Jacobian blocks to ``1 / DEVICE_MEMORY_SHARE`` of the
device's memory, assuming the whole solve peaks at a small multiple of its blocks. This measures that multiple on
CPU, and what the bound does: for an Elman chain ``s = tanh(s W^T + x_l)`` (float32, ``N`` batch rows of width
``w``, weights at spectral scale 1/2), each form in a process of its own, the growth of the process's peak
resident memory over one call (after a first call of the same form: traces, caches), in MiB and in units of the
whole chain's dense blocks (``L N w^2`` values):

* ``newton``: the Newton forward (``jacobian="full"``, under ``torch.no_grad``), the device's memory unbounded;
* ``newton, bounded``: the same with the device's memory set to ``DEVICE_MEMORY_SHARE / 8`` times the chain's
  blocks: a sliding window of ``L / 8`` positions;
* ``adjoint``: the parallel adjoint (forward sequential) in one pass (CPU runs and memory unbounded);
* ``adjoint, bounded``: the same with the device's memory bounded as above: runs of ``L / 8`` positions;
* ``2 ranks: ...``: the same four with the chain split over two gloo ranks (``seqpar.distributed.solve_chain``,
  one thread each, ``L / 2`` steps each), each rank's growth in units of its share's blocks (the larger of
  the two); bounded: the device's memory set as above for the share, so that a rank's runs are ``L / 16``.

Also each call's wall time (one call: the bound's cost in iterations, not a timing study). Markdown to stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import load_average, start_run  # noqa: E402

from seqpar.runtime import budget, solve_chain, spec  # noqa: E402
from seqpar.testing.ranks import run_ranks  # noqa: E402

SOLVES = ("newton", "newton, bounded", "adjoint", "adjoint, bounded")
RANKS = 2
FORMS = (*SOLVES, *(f"{RANKS} ranks: {form}" for form in SOLVES))


def elman(s, x, w):
    return torch.tanh(s @ w.T + x)


def resident(field: str) -> int:
    """Bytes of ``field`` (``VmRSS``, ``VmHWM``) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def one(form: str, length: int, batch: int, width: int) -> dict:
    """One form's peak growth over its second call, its time and what its solve did (the ``--one`` child)."""
    if form.startswith(f"{RANKS} ranks: "):
        rows = run_ranks(on_rank, RANKS, form.split(": ", 1)[1], length, batch, width, timeout=3600.0)
        return max(rows, key=lambda row: row["growth"])
    return peak_of(form, length, batch, width, solve_chain)


def on_rank(rank: int, world: int, form: str, length: int, batch: int, width: int) -> dict:
    """:func:`peak_of` on this rank's share of the chain, solved across the ranks."""
    import seqpar.distributed as sd

    share = length // world
    return peak_of(form, length, batch, width, sd.solve_chain, rows=slice(rank * share, (rank + 1) * share))


def peak_of(form: str, length: int, batch: int, width: int, solve, rows: slice | None = None) -> dict:
    """The growth of this process's peak memory over the second call of ``solve`` (``seqpar.solve_chain`` or a
    rank's ``seqpar.distributed.solve_chain`` on the steps ``rows``), against the blocks of its steps."""
    torch.manual_seed(0)
    rows = rows or slice(0, length)
    blocks = (rows.stop - rows.start) * batch * width * width * 4
    memory = blocks * spec.DEVICE_MEMORY_SHARE // 8 if form.endswith("bounded") else 1 << 62
    budget.device_memory = lambda device: memory
    spec.CPU_RUN_BYTES = 1 << 62  # the memory bound alone decides the adjoint's runs
    s0 = torch.zeros(batch, width)
    xs = torch.randn(length, batch, width)[rows].clone()
    weight = torch.randn(width, width) / (2 * width**0.5)

    def call():
        if form.startswith("newton"):
            with torch.no_grad():
                return solve(elman, s0, xs, (weight,), jacobian="full", return_stats=True)[1]
        leaves = [leaf.clone().requires_grad_() for leaf in (s0, xs, weight)]
        states, stats = solve(elman, leaves[0], leaves[1], (leaves[2],), forward="sequential",
                              adjoint="parallel", return_stats=True)
        torch.autograd.grad(states, leaves, torch.ones_like(states))
        return stats

    call()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the resident size
    before = resident("VmRSS")
    start = time.perf_counter()
    stats = call()
    seconds = time.perf_counter() - start
    growth = resident("VmHWM") - before
    return {"growth": growth, "blocks": blocks, "seconds": seconds, "iterations": stats.iterations,
            "window": stats.window}


def measured(form: str, length: int, batch: int, width: int) -> dict:
    command = [sys.executable, __file__, "--one", form, str(length), str(batch), str(width)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--L", type=int, nargs="+", default=[4096])
    parser.add_argument("--shapes", nargs="+", default=["4x64", "16x32"], help="N x w of the state")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        form, length, batch, width = args.one
        torch.set_num_threads(args.threads)
        print(json.dumps(one(form, int(length), int(batch), int(width))))
        return
    start_run(threads=args.threads)
    print("| chain (N, w) | L | blocks MiB | form | peak growth MiB | x blocks | window | iterations | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for length in args.L:
        for shape in args.shapes:
            batch, width = (int(value) for value in shape.split("x"))
            for form in FORMS:
                row = measured(form, length, batch, width)
                print(f"| elman ({batch}, {width}) | {length} | {row['blocks'] / 2**20:.0f} | {form} | "
                      f"{row['growth'] / 2**20:.0f} | {row['growth'] / row['blocks']:.2f} | {row['window'] or '-'} | "
                      f"{row['iterations']} | {row['seconds']:.2f} |", flush=True)
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
