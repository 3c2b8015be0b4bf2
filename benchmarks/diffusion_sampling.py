"""Sampling time of denoising loops: sliding-window Picard (seqpar) vs the sequential loop.

    .venv/bin/python benchmarks/diffusion_sampling.py --steps 50 250 --windows 8 32 --denoisers mlp unet

For each scheduler (DDIM, DDPM, Euler ancestral; traceable adapters, pre-drawn
noise), denoiser, T and window: the loop compiled with
``backend="seqpar", policy="parallel"`` (inner "eager") against the same loop
compiled with ``policy="sequential"`` ("sequential", the speedup's baseline) and
the eager loop (whose traceable scheduler checks each timestep with ``.item()``),
float64, batch of 2 samples. Reports the median of ``--repeats`` timed calls
after a warm-up call, parallel iterations, denoiser evaluations (per position;
the loop makes T) and the largest difference from the loop. Markdown to stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqpar.backend import SeqparBackend  # noqa: E402
from tests.test_denoise import inputs, make_denoiser, make_sample, make_scheduler  # noqa: E402


def timed(fn, *args, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 250, 1000])
    parser.add_argument("--windows", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--schedulers", nargs="+", default=["ddim", "ddpm", "euler_ancestral"])
    parser.add_argument("--denoisers", nargs="+", default=["mlp", "unet"])
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float64, tol {args.tol:g}\n")
    print("| scheduler | denoiser | T | window | eager loop ms | sequential ms | seqpar ms | speedup | iterations | evaluations | max abs diff | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for denoiser in args.denoisers:
        for scheduler in args.schedulers:
            for steps in args.steps:
                sched = make_scheduler(scheduler, steps)
                model, shape = make_denoiser(denoiser, sched)
                sample = make_sample(sched, model)
                x, noise = inputs(sched, shape)
                torch._dynamo.reset()
                baseline = torch.compile(sample, backend=SeqparBackend({"policy": "sequential", "inner": "eager",
                                                                        "min_chain": 4}))
                with torch.no_grad():
                    want = sample(x, noise)
                    eager = timed(sample, x, noise, repeats=args.repeats)
                    baseline(x, noise)
                    sequential = timed(baseline, x, noise, repeats=args.repeats)
                for window in args.windows:
                    torch._dynamo.reset()
                    backend = SeqparBackend({"policy": "parallel", "inner": "eager", "min_chain": 4,
                                             "tol": args.tol, "window": window})
                    compiled = torch.compile(sample, backend=backend)
                    with torch.no_grad():
                        got = compiled(x, noise)
                        parallel = timed(compiled, x, noise, repeats=args.repeats)
                    chains = [c for g in backend.graphs for c in g.chains if c.kind == "denoise"]
                    stats = chains[0].stats if chains and chains[0].stats else {}
                    note = "" if stats else (chains[0].reason[:80] if chains else "no chain")
                    if stats.get("fallback"):
                        note = stats["fallback"][:60]
                    print(f"| {scheduler} | {denoiser} | {steps} | {window} | {eager * 1e3:.1f} | {sequential * 1e3:.1f} | "
                          f"{parallel * 1e3:.1f} | {sequential / parallel:.2f} | {stats.get('iterations', '-')} | "
                          f"{stats.get('evaluations', '-')} | {float((got - want).abs().max()):.1e} | {note} |",
                          flush=True)


if __name__ == "__main__":
    main()
