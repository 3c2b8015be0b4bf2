"""How long inductor takes to compile a recurrent model's unrolled loop, and where that leads at longer sequences.

    .venv/bin/python benchmarks/inductor_compile.py --family rwkv --kind forward --seq 64 128 256 512 --limit 1800

Dynamo unrolls a reference loop (``for t in range(L)``) into a graph of ``O(L)`` nodes, and inductor's compile of
that graph (lowering, scheduling, fusion, code generation) grows faster than ``L``: at 1024 and 4096 steps it takes
tens of minutes to hours on two cores, which is why §4's table of issue 13 lacks inductor's column there. This
script measures that growth where it is affordable. Each length runs in its own process (the model built as
``recurrent_models.py`` builds it, inductor's caches disabled so that every process compiles), which times:

* three calls: the first compiles (Dynamo's trace, AOT autograd, inductor's compile; for ``--kind training`` the
  forward, and its backward's graph at the first backward); the second may compile again (RWKV rescales its
  weights at its first call in eval mode and flips a flag Dynamo guards); the third runs the compiled code alone.
  The compile time is what the first two took beyond two calls of the third's time;
* one eager call after an untimed one, in the same process.

A process still compiling after ``--limit`` seconds is stopped and its row says so. From consecutive measured
lengths the growth exponent ``p`` (``t ~ L^p``: ``p = log(t2 / t1) / log(L2 / L1)``) is printed, and the last
one extrapolates the compile to the lengths of ``--predict``: an estimate, labelled as one. Markdown to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import torch

from recurrent_models import FAMILIES, add_width_options, built, forward, hidden_states, training_step
from timing import median_time


def one_length(args) -> dict:
    """Compile and time one length in this process (``--one``): seconds of inductor's compile, of a compiled call and
    of an eager call (module docstring)."""
    torch.set_num_threads(args.threads)
    torch._inductor.config.force_disable_caches = True
    torch.manual_seed(0)
    model = built(args.family, args).train(args.kind == "training")
    ids = torch.randint(0, 1000, (args.batch, args.one))
    make = training_step if args.kind == "training" else forward
    compiled = make(torch.compile(hidden_states(model), backend="inductor"), ids)
    calls = [median_time(compiled, 1, warmup=0) for _ in range(3)]
    eager = median_time(make(hidden_states(model), ids), 1, warmup=1)
    return {"compile": calls[0] + calls[1] - 2 * calls[2], "compiled": calls[2], "eager": eager}


def growth_exponent(point_1: tuple, point_2: tuple) -> float:
    """``p`` with ``t ~ L^p`` through two ``(L, t)`` points: ``log(t2 / t1) / log(L2 / L1)``."""
    (length_1, seconds_1), (length_2, seconds_2) = point_1, point_2
    return math.log(seconds_2 / seconds_1) / math.log(length_2 / length_1)


def measured(args, length: int) -> dict | None:
    """:func:`one_length` in a child process; ``None`` where it ran past ``--limit`` seconds."""
    command = [sys.executable, __file__, "--one", str(length), "--family", args.family, "--kind", args.kind,
               "--batch", str(args.batch), "--threads", str(args.threads), "--gemma-mlp", str(args.gemma_mlp),
               "--xlstm-hidden", str(args.xlstm_hidden)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.limit, check=True)
    except subprocess.TimeoutExpired:
        return None
    except subprocess.CalledProcessError as error:  # the child's own traceback, not this process's
        sys.exit(f"{args.family} at {length} steps failed (exit {error.returncode}):\n{error.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="rwkv", choices=list(FAMILIES))
    parser.add_argument("--kind", default="forward", choices=["forward", "training"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--predict", nargs="+", type=int, default=[1024, 4096])
    parser.add_argument("--limit", type=float, default=1800.0, help="seconds one length may take, compile included")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    add_width_options(parser)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_length(args)))
        return
    print(f"threads {args.threads}, float32, CPU, {args.family} {args.kind}, batch {args.batch}; inductor's caches "
          f"disabled; each length its own process, stopped after {args.limit:.0f} s\n")
    print("| seq | inductor's compile | inductor's call | eager call | growth exponent p of the compile |")
    print("|---|---|---|---|---|")
    points = []
    for length in args.seq:
        seconds = measured(args, length)
        if seconds is None:
            print(f"| {length} | not done in {args.limit:.0f} s | - | - | - |", flush=True)
            break
        points.append((length, seconds["compile"]))
        growth = f"{growth_exponent(*points[-2:]):.2f}" if len(points) >= 2 else "-"
        print(f"| {length} | {seconds['compile']:.1f} s | {seconds['compiled'] * 1e3:.1f} ms | "
              f"{seconds['eager'] * 1e3:.1f} ms | {growth} |", flush=True)
    if len(points) >= 2:
        (length_1, _), (length_2, seconds_2) = points[-2:]
        exponent = growth_exponent(*points[-2:])
        estimates = ", ".join(f"{target} steps ~{seconds_2 * (target / length_2) ** exponent / 60:.0f} min"
                              for target in args.predict)
        print(f"\nEstimated compile (extrapolated with p = {exponent:.2f} from {length_1} and {length_2} steps; "
              f"the fixed part of the compile makes p, and so the estimate, low): {estimates}")


if __name__ == "__main__":
    main()
