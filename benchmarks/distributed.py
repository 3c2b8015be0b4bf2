"""Chains across ranks: ``seqpar.distributed.LayerParallel`` against ``torch.distributed.pipelining`` (issue 15 §3).

    .venv/bin/python benchmarks/distributed.py                       # 2 ranks, a few minutes
    .venv/bin/python benchmarks/distributed.py --world 2 --depth 512 --width 8 --batch 1 --microbatches 1 4

The model: ``L`` blocks ``(Linear(w, w), Tanh)`` (DeepPCR's MLP), float32, split over ``P`` ranks (gloo, one
process and one thread per rank: on the 2-core CPU, ``P = 2`` uses both cores). For each microbatch count ``M``
the whole batch is ``M x B`` rows, and every row is timed with the whole group (a barrier before, a barrier after,
so a row's time is the slowest rank's), median of ``--repeats`` turns:

* ``eager, one process``: the stack on the whole batch in rank 0 alone (the others wait);
* ``seqpar.solve_chain, one process``: the single-device solver on rank 0 alone, on pre-stacked weights;
* ``seqpar.distributed``: ``LayerParallel(forward="parallel")`` on the whole batch, all ranks, and
  ``LayerParallel`` with its default, which times the forward in parallel against rank after rank on its
  first calls and keeps the faster (the row names the form it kept);
* ``pipelining GPipe`` / ``1F1B``: the same split as ``PipelineStage`` s, ``M`` microbatches of ``B`` rows
  (1F1B needs ``M >= P``).

Forward rows run under ``torch.no_grad`` (pipelining: ``schedule.eval``); training rows are one forward and
backward of ``sum((y - target)^2)`` without the optimizer step. Ratios are eager's time over each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from seqpar.testing.ranks import run_ranks  # noqa: E402


def stack(depth, width):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)])


def timed(fn, repeats, alone=False, rank=0):
    """Median seconds of ``fn`` over the group (barriers around each turn); ``alone``: only ``rank`` runs it."""
    times = []
    for turn in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        if not alone or dist.get_rank() == rank:
            fn()
        dist.barrier()
        if turn:  # the first turn warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(rank, world, depth, width, batch, microbatches, repeats, kinds):
    import seqpar
    from seqpar.distributed import LayerParallel
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    model = stack(depth, width)
    parallel = LayerParallel(model, forward="parallel")
    default = LayerParallel(model)  # times both forwards on its first calls and keeps the faster
    local = nn.Sequential(*parallel.blocks)
    weights = torch.stack([block[0].weight.detach() for block in model])
    biases = torch.stack([block[0].bias.detach() for block in model])
    rows = []
    for count in microbatches:
        total = count * batch
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(total, width, generator=generator)
        target = torch.randn(total, width, generator=generator)

        def solver():
            return seqpar.solve_chain(lambda s, p: torch.tanh(torch.nn.functional.linear(s, p[0], p[1])), x,
                                      (weights, biases))

        def loss_fn(output, target):
            return (output - target).square().sum()

        def pipelined(schedule_type, train):
            stage = PipelineStage(local, rank, world, torch.device("cpu"))
            schedule = schedule_type(stage, n_microbatches=count, loss_fn=loss_fn if train else None)

            def run():
                if train:
                    args = (x,) if rank == 0 else ()
                    kwargs = {"target": target} if rank == world - 1 else {}
                    schedule.step(*args, **kwargs)
                else:
                    with torch.no_grad():
                        schedule.eval(*((x,) if rank == 0 else ()))
            return run

        def train_eager():
            loss_fn(model(x), target).backward()

        def train_parallel():
            loss_fn(parallel(x), target).backward()

        def train_default():
            loss_fn(default(x), target).backward()

        for _ in range(4):  # past the default's trial (the kept form is per group and model, not per batch)
            with torch.no_grad():
                default(x)

        for kind in kinds:
            train = kind == "training"
            with torch.set_grad_enabled(train):
                candidates = {
                    "eager, one process": (train_eager if train else lambda: model(x), True),
                    "seqpar.solve_chain, one process": (None if train else solver, True),
                    "seqpar.distributed (LayerParallel, forward in parallel)": (
                        train_parallel if train else lambda: parallel(x), False),
                    f"LayerParallel default (kept: forward {default.forward_form})": (
                        train_default if train else lambda: default(x), False),
                    "pipelining GPipe": (pipelined(ScheduleGPipe, train), False),
                    "pipelining 1F1B": (pipelined(Schedule1F1B, train) if train and count >= world else None, False),
                }
                for name, (fn, alone) in candidates.items():
                    if fn is None:
                        continue
                    seconds = timed(fn, repeats, alone=alone)
                    rows.append(dict(kind=kind, microbatches=count, rows=total, name=name, seconds=seconds))
            model.zero_grad(set_to_none=True), parallel.zero_grad(set_to_none=True), default.zero_grad(set_to_none=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--depth", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1, help="rows per microbatch")
    parser.add_argument("--microbatches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--kinds", nargs="+", default=["forward", "training"], choices=["forward", "training"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.world} ranks (gloo, 1 thread each), (Linear({args.width}, "
          f"{args.width}), Tanh) blocks, float32; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| depth | kind | microbatches x rows | what | ms | eager / this |")
    print("|---|---|---|---|---|---|")
    for depth in args.depth:
        rows = run_ranks(measure, args.world, depth, args.width, args.batch, args.microbatches, args.repeats,
                         args.kinds, timeout=3600.0, group_timeout=600.0)[0]
        eager = {(row["kind"], row["microbatches"]): row["seconds"] for row in rows
                 if row["name"] == "eager, one process"}
        for row in rows:
            base = eager[(row["kind"], row["microbatches"])]
            print(f"| {depth} | {row['kind']} | {row['microbatches']} x {args.batch} | {row['name']} | "
                  f"{row['seconds'] * 1e3:.2f} | {base / row['seconds']:.2f} |")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
