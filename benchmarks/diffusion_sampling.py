"""Sampling time of denoising loops: sliding-window Picard (seqpar) vs the sequential loop.

    .venv/bin/python benchmarks/diffusion_sampling.py --steps 50 250 --windows 8 32 --denoisers mlp unet [--form scan]

For each scheduler (DDIM, DDPM, Euler ancestral; traceable adapters, pre-drawn
noise), denoiser, T and window: the loop compiled with
``backend="seqpar", policy="parallel"`` (inner "eager") against the same loop
compiled with ``policy="sequential"`` ("sequential", the speedup's baseline) and
the eager loop ("eager ms": the same form, uncompiled; its traceable scheduler checks each timestep with ``.item()``),
float64, batch of 2 samples. ``--form scan`` compiles ``sched.scan_loop``
instead of the unrolled loop (Dynamo traces the denoiser once: the only way
to a 1000-step UNet loop here). Reports the median of ``--repeats`` timed calls
after a warm-up call, parallel iterations, denoiser evaluations (per position;
the loop makes T) and the largest difference from the loop. Markdown to stdout.

    .venv/bin/python benchmarks/diffusion_sampling.py --compare-jacobians --steps 50 250 --windows 8 16 32 64

Picard (``jacobian="identity"``) against the Jacobian estimate
(``jacobian="estimate"``: ``A_l = c_l I`` from one VJP per position) on the
same chain, solved by the runtime directly (``newton_solve``, no Dynamo). The
chain is the loop's (:func:`loop_as_chain`): state ``x``, per-step inputs
(timestep, the traceable scheduler's coefficient row, noise row), shared =
the denoiser's parameters. For each
window: iterations, evaluations and VJPs to convergence (exact counts; the
estimate makes one VJP per position, at its first evaluation), the measured
cost of one estimate evaluation (forward + VJP, batched over the window) in
forward evaluations, the estimate's evaluation-equivalents (evaluations + VJPs
x (cost - 1)), solve times, the largest difference from the loop, and ``W
|lambda|`` (the Lyapunov probe, which the policy's rule reads).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.utils._pytree as pytree
from torch.func import functional_call

from seqpar.backend import SeqparBackend
from seqpar.runtime.lyapunov import largest_lyapunov_exponent
from seqpar.runtime.newton import Tolerance, newton_solve
from seqpar.runtime.program import windowed_steps
from seqpar.runtime.program import ChainProgram, StateLayout
from seqpar.testing.sampling import sampling_loop
from timing import median_time


def loop_as_chain(sched, model, x, noise):
    """``(step, s0, xs, shared)``: the sampling loop of ``seqpar.testing.sampling.make_sample`` as a runtime chain.

    ``step(x, (t, row, z), *params)`` is the scheduler's update at the position
    of ``row`` (a dict of table rows) with the denoiser's parameters
    ``params``. Every step adds its noise row: DDPM's last row is zero, and
    adding ``sigma * 0`` changes nothing.
    """
    keys = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
    shared = [tensor.detach() for _, tensor in model.named_parameters()]
    shared += [tensor for _, tensor in model.named_buffers()]
    xs = (sched.timesteps, dict(sched._table), noise)
    options = sched._static_options(0)

    def step(sample, per_step, *params):
        t, row, z = per_step
        output = functional_call(model, dict(zip(keys, params)), (sched._scale_input(row, sample), t))
        return sched._update(row, output, sample, z, **options)[0]

    return step, x * sched.init_noise_sigma, xs, shared


def chain_program(step, s0, xs, shared, jacobian):
    """``(program, xs leaves)``: the runtime's program for a :func:`loop_as_chain` chain, batch dim 0.

    Built directly, not by ``solve_chain``, whose checks want every input in the
    state's dtype: the traceable schedulers keep float32 tables (as the op receives them).
    """
    leaves, spec = pytree.tree_flatten(xs)
    layout = StateLayout(spec=pytree.tree_structure(s0), batch_shape=s0.shape[:1], leaf_shapes=(s0.shape[1:],),
                         dtype=s0.dtype, device=s0.device)
    return ChainProgram(step, layout, leaves[0].shape[0], spec, leaves, shared, jacobian, "sequential"), leaves


def timed(fn, *args, repeats):
    return median_time(lambda: fn(*args), repeats, warmup=0)


def best_time(fn, repeats, rounds=3):
    """The smallest of ``rounds`` medians of ``repeats`` calls (the CPU is shared: noise only adds)."""
    return min(timed(fn, repeats=repeats) for _ in range(rounds))


def cost_ratio(first, second, repeats):
    """``min time(second) / min time(first)`` over ``repeats`` interleaved calls of each."""
    best = [math.inf, math.inf]
    for _ in range(repeats):
        for index, fn in enumerate((first, second)):
            start = time.perf_counter()
            fn()
            best[index] = min(best[index], time.perf_counter() - start)
    return best[1] / best[0]


def sampling_loops(args):
    """``(denoiser, scheduler, T, scheduler object, model, sample, x, noise)`` for every configuration asked for."""
    for denoiser in args.denoisers:
        for scheduler in args.schedulers:
            for steps in args.steps:
                loop = sampling_loop(scheduler, denoiser, steps, args.form)
                yield denoiser, scheduler, steps, loop.sched, loop.model, loop.sample, loop.x, loop.noise


def compare_jacobians(args):
    """Picard vs the Jacobian estimate per denoiser, scheduler, T and window: one markdown row each."""
    print(f"torch {torch.__version__}, {args.threads} threads, float64, tol {args.tol:g}\n")
    print("| denoiser | scheduler | T | W | W abs(lambda) | Picard iterations | Picard evaluations | estimate iterations | "
          "estimate evaluations | estimate VJPs | estimate cost (x forward) | estimate eval-equivalents | "
          "Picard / estimate | Picard ms | estimate ms | max diff Picard | max diff estimate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for denoiser, scheduler, steps, sched, model, sample, x, noise in sampling_loops(args):
        with torch.no_grad():
            want = sample(x, noise)
            step, s0, xs, shared = loop_as_chain(sched, model, x, noise)
            programs = {kind: chain_program(step, s0, xs, shared, kind) for kind in ("identity", "estimate")}
            program, leaves = programs["identity"]
            packed = program.layout.pack(s0)
            lyapunov = largest_lyapunov_exponent(program.lowered, steps, packed, leaves, shared, max_steps=256)
            for window in args.windows:
                if window >= steps:
                    continue
                prev = packed.expand(window, *packed.shape).contiguous()
                sliced = [leaf[:window] for leaf in programs["identity"][1]]
                forward, estimated = (windowed_steps(programs[kind][0], window, programs[kind][1], shared)
                                      for kind in ("identity", "estimate"))
                ratio = cost_ratio(lambda: forward(prev, sliced, shared), lambda: estimated(prev, sliced, shared),
                                   args.repeats * 10)
                row = {}
                for kind, (program, leaves) in programs.items():
                    solve = lambda: newton_solve(  # noqa: E731
                        program, packed, leaves, shared, tol=Tolerance.resolve(args.tol, s0.dtype),
                        max_iters=min(steps, 4 * -(-steps // window) + 40), window=window)
                    states, stats = solve()
                    final = program.layout.unpack(states)[-1]
                    row[kind] = (stats, best_time(solve, args.repeats), float((final - want).abs().max()))
                picard, picard_s, picard_diff = row["identity"]
                estimate, estimate_s, estimate_diff = row["estimate"]
                equivalents = estimate.evaluations + estimate.jacobian_evaluations * (ratio - 1)
                note = "" if picard.converged and estimate.converged else " (fallback)"
                print(f"| {denoiser} | {scheduler} | {steps} | {window} | {window * abs(lyapunov):.2f} | "
                      f"{picard.iterations} | {picard.evaluations} | {estimate.iterations} | {estimate.evaluations} | "
                      f"{estimate.jacobian_evaluations} | {ratio:.2f} | {equivalents:.0f} | {picard.evaluations / equivalents:.2f}{note} | "
                      f"{picard_s * 1e3:.1f} | {estimate_s * 1e3:.1f} | {picard_diff:.1e} | {estimate_diff:.1e} |",
                      flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 250, 1000])
    parser.add_argument("--windows", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--schedulers", nargs="+", default=["ddim", "ddpm", "euler_ancestral"])
    parser.add_argument("--denoisers", nargs="+", default=["mlp", "unet"])
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--form", choices=["loop", "scan"], default="loop",
                        help="compile the unrolled loop, or the same loop as sched.scan_loop")
    parser.add_argument("--compare-jacobians", action="store_true",
                        help="Picard vs the Jacobian estimate on the runtime directly (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.compare_jacobians:
        compare_jacobians(args)
        return
    print(f"torch {torch.__version__}, {args.threads} threads, float64, tol {args.tol:g}\n")
    print("| scheduler | denoiser | T | window | eager ms | sequential ms | seqpar ms | speedup | iterations | evaluations | max abs diff | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for denoiser, scheduler, steps, sched, model, sample, x, noise in sampling_loops(args):
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
