"""Diagonal and affine chains: ``solve_chain`` against the Python loop (issue 13 §2).

    .venv/bin/python benchmarks/structure.py --L 1024 4096 --repeats 7

Cases (float32, one thread, the step traced once before timing):

* ``diag``: Mamba's selective scan ``s = a_l * s + b_l`` on a ``(1, d, 16)``
  state, ``d`` in ``--widths`` (64 and 768: 1024 and 12288 values), ``a_l`` in
  ``(0, 0.9)``, with the default ``batch_ndim`` (all but the last dim: ``N = d``
  batch elements of ``w = 16``) and with ``batch_ndim=3`` (``w = 1``);
* ``dense``: ``s = s A_l^T + b_l`` on a ``(4, 16)`` state, ``A_l`` of norm 0.9.

Times are medians of ``--repeats`` interleaved rounds (``timing.interleaved_medians``:
the loop and the solve timed in turns, so load that comes and goes falls on
both); the loop stacks its states as ``solve_chain`` returns them. Also: the
solve's iterations, Jacobian, structure (``-`` before it was recorded) and its
largest difference from the loop relative to the states' largest magnitude.
Runs against whichever ``seqpar`` is first on ``sys.path`` (``PYTHONPATH`` a
checkout of another commit to time that one). ``--skip-dense-blocks-above``
leaves out configurations whose dense ``(L, N, w, w)`` Jacobians would take
more memory than that many GiB (a commit without the diagonal structure
builds them). Markdown to stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import interleaved_medians, load_average, start_run  # noqa: E402

from seqpar.runtime import solve_chain  # noqa: E402


def scan_step(s, x):
    return x[0] * s + x[1]


def dense_step(s, x):
    return s @ x[0].T + x[1]


def loop(step, s0, xs):
    """The states of the plain Python loop, stacked."""
    state, states = s0, []
    for index in range(xs[0].shape[0]):
        state = step(state, (xs[0][index], xs[1][index]))
        states.append(state)
    return torch.stack(states)


def cases(lengths, widths):
    """``(name, step, s0, xs, batch_ndim, dense block bytes before the structure was used)`` per configuration."""
    for length in lengths:
        for width in widths:
            shape = (1, width, 16)
            xs = (0.9 * torch.rand(length, *shape), torch.randn(length, *shape))
            s0 = torch.randn(shape)
            yield f"diag {shape}", scan_step, s0, xs, None, length * width * 16 * 16 * 4
            yield f"diag {shape}", scan_step, s0, xs, 3, length * width * 16 * 4
        A = 0.9 * torch.linalg.qr(torch.randn(length, 16, 16))[0]
        yield "dense (4, 16)", dense_step, torch.randn(4, 16), (A, torch.randn(length, 4, 16)), None, 0


def row(name, step, s0, xs, batch_ndim, repeats) -> str:
    length = xs[0].shape[0]
    expected = loop(step, s0, xs)
    states, stats = solve_chain(step, s0, xs, batch_ndim=batch_ndim, return_stats=True)
    error = float((states - expected).abs().max() / expected.abs().max())
    times = interleaved_medians(
        {"loop": lambda: loop(step, s0, xs), "solve": lambda: solve_chain(step, s0, xs, batch_ndim=batch_ndim)},
        repeats,
    )
    structure = getattr(stats, "structure", "-")
    return (
        f"| {name} | {'default' if batch_ndim is None else batch_ndim} | {length} | {times['loop'] * 1e3:.2f} | "
        f"{times['solve'] * 1e3:.2f} | **{times['loop'] / times['solve']:.2f}** | {stats.iterations} | "
        f"{stats.jacobian} | {structure} | {error:.1e} |"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--L", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 768])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-dense-blocks-above", type=float, default=None, metavar="GIB")
    args = parser.parse_args()
    start_run(threads=1)
    print("| case | batch_ndim | L | loop ms | solve_chain ms | loop / solve | iterations | jacobian | structure | "
          "max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, step, s0, xs, batch_ndim, block_bytes in cases(args.L, args.widths):
        limit = args.skip_dense_blocks_above
        if limit is not None and block_bytes > limit * 2**30:
            print(f"| {name} | {'default' if batch_ndim is None else batch_ndim} | {xs[0].shape[0]} | "
                  f"not run: {block_bytes / 2**30:.1f} GiB of dense blocks | | | | | | |", flush=True)
            continue
        print(row(name, step, s0, xs, batch_ndim, args.repeats), flush=True)
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
