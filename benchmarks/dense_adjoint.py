"""The adjoint of a dense recurrent cell: sequential VJPs, one pass over the chain, or runs of positions.

    .venv/bin/python benchmarks/dense_adjoint.py --L 1024 4096 --repeats 5
    .venv/bin/python benchmarks/dense_adjoint.py --L 4096 16384 --peak      # peak memory instead of times

A training step of a chain kept sequential in its forward (what the CPU policy does above ``N*w = 8``), as
``diagonal_adjoint.py`` times it (its columns, its error column): the forms ``eager`` (autograd over the Python
loop), ``sequential`` (``L`` VJPs in one generated loop), ``one pass`` (dense Jacobian blocks of all ``L`` steps,
``L N w^2`` values, one PCR solve, one batched VJP) and ``runs`` (the same in runs whose blocks fit
``seqpar.runtime.spec.CPU_RUN_BYTES``, the last run first). Steps (float32), ``N`` batch rows of width ``w``:

* ``gru``: ``torch.nn.GRUCell``'s kernel, ``s = gru_cell(x_l, s, W_ih, W_hh, b_ih, b_hh)``;
* ``elman``: ``s = tanh(s W^T + x_l)``.

``--peak`` runs every form of every case in a process of its own (two training steps) and reports the growth of
the process's peak resident memory over what the inputs took, in MiB. Markdown to stdout.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diagonal_adjoint import eager_loop, row  # noqa: E402
from timing import load_average, start_run  # noqa: E402

from seqpar.runtime import solve_chain, spec  # noqa: E402

FORMS = {"eager": None, "sequential": ("sequential", 1 << 20), "one pass": ("parallel", 1 << 62),
         "runs": ("parallel", 1 << 20)}


def gru(s, x, w_ih, w_hh, b_ih, b_hh):
    return torch._VF.gru_cell(x[0], s, w_ih, w_hh, b_ih, b_hh)


def elman(s, x, w):
    return torch.tanh(s @ w.T + x[0])


def case(name: str, length: int, batch: int, width: int):
    """``(label, step, s0, xs, shared)`` of one chain, weights at spectral scale about 1/2 (a contracting chain)."""
    xs = (torch.randn(length, batch, width),)
    if name == "gru":
        cell = torch.nn.GRUCell(width, width)
        shared = tuple(p.detach().clone() for p in cell.parameters())
        return f"gru ({batch}, {width})", gru, torch.zeros(batch, width), xs, shared
    weight = torch.randn(width, width) / (2 * width**0.5)
    return f"elman ({batch}, {width})", elman, torch.zeros(batch, width), xs, (weight,)


def cases(lengths, shapes):
    for length in lengths:
        for batch, width in shapes:
            for name in ("gru", "elman"):
                yield name, length, batch, width


def peak_growth(name, length, batch, width, form) -> float:
    """MiB the peak resident memory grows by over two training steps of ``form``, in a process of its own."""
    command = [sys.executable, __file__, "--one", name, str(length), str(batch), str(width), form]
    return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def one(name, length, batch, width, form) -> None:
    """Print the peak growth of two training steps of one form (the ``--one`` child of :func:`peak_growth`)."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    _, step, s0, xs, shared = case(name, length, batch, width)
    for leaf in (s0, *xs, *shared):
        leaf.requires_grad_(True)
    cotangent = torch.randn(length, *s0.shape)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(2):
        if FORMS[form] is None:
            states = eager_loop(step, s0, xs, shared)
        else:
            adjoint, spec.CPU_RUN_BYTES = FORMS[form]
            states = solve_chain(step, s0, xs, shared, forward="sequential", adjoint=adjoint)
        torch.autograd.grad(states, (s0, *xs, *shared), cotangent)
        del states
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--L", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--shapes", nargs="+", default=["1x16", "4x16", "16x16", "1x64", "4x64", "16x64"],
                        help="N x w of the state")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peak", action="store_true")
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, length, batch, width, form = args.one
        return one(name, int(length), int(batch), int(width), form)
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes]
    start_run(threads=args.threads)
    if args.peak:
        print("| step (N, w) | L | " + " | ".join(f"{form} MiB" for form in FORMS) + " |")
        print("|---|---|" + "---|" * len(FORMS))
        for name, length, batch, width in cases(args.L, shapes):
            cells = " | ".join(f"{peak_growth(name, length, batch, width, form):.0f}" for form in FORMS)
            print(f"| {name} ({batch}, {width}) | {length} | {cells} |", flush=True)
    else:
        print("| step (N, w) | N*w | L | eager ms | sequential ms (eager/it) | one pass ms | runs ms | "
              "max rel grad diff (sequential, one pass, runs) |")
        print("|---|---|---|---|---|---|---|---|")
        for name, length, batch, width in cases(args.L, shapes):
            print(row(*case(name, length, batch, width), args.repeats), flush=True)
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
