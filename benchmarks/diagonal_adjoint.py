"""The adjoint of a wide diagonal chain: sequential VJPs, one pass over the chain, or runs of positions.

    .venv/bin/python benchmarks/diagonal_adjoint.py --L 256 1024 --repeats 7

A training step of a chain kept sequential in its forward (what the CPU policy does above
``N*w = 1024``): ``solve_chain(step, s0, xs, shared, forward="sequential", adjoint=...)`` and the
gradients of ``<C, states>`` for a fixed cotangent ``C``, against eager autograd over the Python loop.
Columns (ms per training step, medians of ``--repeats`` interleaved rounds,
``timing.interleaved_medians``):

* ``eager``: the Python loop recorded by autograd, then its backward (the inputs' rows by one ``unbind``);
* ``sequential``: the op's loop, then ``L`` vector-Jacobian products, last step first (the step's VJP graph
  written out as one loop, ``seqpar.runtime.rolled_adjoint``);
* ``one pass``: the parallel adjoint over the whole chain at once (diagonal Jacobian blocks of all ``L``
  steps, the reverse substitution, one batched VJP): chain-sized temporaries;
* ``runs``: the same in runs whose blocks fit ``seqpar.runtime.spec.CPU_RUN_BYTES`` (1 MiB), the
  last run first (``seqpar.runtime.adjoint.adjoint_in_runs``).

Steps (float32, one thread), ``N*w`` values per state:

* ``affine``: ``s = sigmoid(p_l) * s + x_l * u`` (RWKV's and the RG-LRU's shape);
* ``gate``: ``s = sigmoid(p_l) * s + (1 - sigmoid(p_l)) * tanh(x_l + s / 2)`` (diagonal, not affine);
* ``memory``: xLSTM's matrix memory ``C = f_l C + i_l k_l v_l^T`` per head, ``(8, D, 2D)`` values.

Also the largest gradient difference of each form from eager's, relative to eager's largest gradient.
Markdown to stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import interleaved_medians, load_average, start_run  # noqa: E402

from seqpar.runtime import solve_chain, spec  # noqa: E402


def affine(s, x, u):
    return torch.sigmoid(x[0]) * s + x[1] * u


def gate(s, x, u):
    a = torch.sigmoid(x[0])
    return a * s + (1 - a) * torch.tanh(x[1] * u + s / 2)


def memory(s, x, u):
    forget, key, value = x
    return torch.sigmoid(forget)[..., None, None] * s + (key * u)[..., :, None] * value[..., None, :]


def cases(lengths, widths):
    """``(name, step, s0, xs, shared)``: ``widths`` are ``N*w`` for the elementwise steps; the memory runs at
    ``D = 32`` and ``64`` (16384 and 65536 values)."""
    for length in lengths:
        for width in widths:
            shape = (4, width // 4)
            xs = (torch.randn(length, *shape), torch.randn(length, *shape))
            for name, step in (("affine", affine), ("gate", gate)):
                yield f"{name} {shape}", step, torch.randn(shape), xs, (torch.randn(shape[-1]),)
        for depth in (32, 64):
            xs = (torch.randn(length, 8), torch.randn(length, 8, depth), torch.randn(length, 8, 2 * depth) / depth)
            yield f"memory (8, {depth}, {2 * depth})", memory, torch.randn(8, depth, 2 * depth), xs, (torch.randn(depth),)


def eager_loop(step, s0, xs, shared):
    """The loop over the inputs' rows taken by one ``unbind`` (indexing ``x[l]`` instead would make autograd
    add a chain-sized gradient per step: quadratic in ``L``, tens of seconds at 1024 steps)."""
    state, states = s0, []
    for x in zip(*(leaf.unbind(0) for leaf in xs)):
        state = step(state, x, *shared)
        states.append(state)
    return torch.stack(states)


def row(name, step, s0, xs, shared, repeats) -> str:
    leaves = [s0, *xs, *shared]
    for leaf in leaves:
        leaf.requires_grad_(True)
    cotangent = torch.randn(xs[0].shape[0], *s0.shape)

    def training(solve):
        def run():
            return torch.autograd.grad(solve(), leaves, cotangent)

        return run

    def chain(adjoint, run_bytes):
        def solve():
            spec.CPU_RUN_BYTES = run_bytes
            return solve_chain(step, s0, xs, shared, forward="sequential", adjoint=adjoint)

        return solve

    forms = {
        "eager": training(lambda: eager_loop(step, s0, xs, shared)),
        "sequential": training(chain("sequential", 1 << 20)),
        "one pass": training(chain("parallel", 1 << 62)),
        "runs": training(chain("parallel", 1 << 20)),
    }
    reference = forms["eager"]()
    scale = max(float(g.abs().max()) for g in reference)
    errors = {
        form: max(float((a - b).abs().max()) for a, b in zip(forms[form](), reference)) / scale
        for form in ("sequential", "one pass", "runs")
    }
    times = interleaved_medians(forms, repeats, budget=0.05)
    eager = times["eager"]
    cells = " | ".join(f"{times[form] * 1e3:.1f} ({eager / times[form]:.2f}x)" for form in forms if form != "eager")
    diffs = ", ".join(f"{errors[form]:.0e}" for form in errors)
    spec.CPU_RUN_BYTES = 1 << 20
    return f"| {name} | {s0.numel()} | {xs[0].shape[0]} | {eager * 1e3:.1f} | {cells} | {diffs} |"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--L", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 4096, 12288])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    start_run(threads=1)
    print("| step (state) | N*w | L | eager ms | sequential ms (eager/it) | one pass ms | runs ms | "
          "max rel grad diff (sequential, one pass, runs) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, step, s0, xs, shared in cases(args.L, args.widths):
        print(row(name, step, s0, xs, shared, args.repeats), flush=True)
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
