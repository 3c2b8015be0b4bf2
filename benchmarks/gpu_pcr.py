"""Time the Triton affine-recurrence kernels against the torch PCR path on a GPU.

For every kind (full, diag, identity), direction (forward, reverse), chain length
L, state width w and batch N, solves ``y_l = A_l y_{l-1} + c_l`` (or its adjoint)
in float32 three ways and prints one markdown row per case:

* ``triton``:  :func:`seqpar.runtime.kernels.triton_pcr.solve_affine_recurrence`;
* ``torch``:   :func:`seqpar.runtime.pcr.solve_affine_recurrence` with the Triton
  dispatch switched off (recursive doubling with batched matmuls);
* ``compiled``: the same torch path under ``torch.compile`` (one compile per
  shape, so the full grid takes a while: narrow it with the options or skip it
  with ``--no-compile``).

Times are medians of ``triton.testing.do_bench`` in milliseconds; ``max rel err``
is the Triton result against the torch path, relative to ``max |y|``.

    python benchmarks/gpu_pcr.py [--lengths 1024 4096] [--widths 1 8] [--no-compile]
"""

from __future__ import annotations

import argparse
import sys
from unittest import mock

import torch

from seqpar.runtime import pcr, spec
from seqpar.runtime.kernels import triton_pcr

COLUMNS = (
    "kind", "direction", "L", "w", "N",
    "triton ms", "torch ms", "compiled ms", "torch / triton", "compiled / triton", "max rel err",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--kinds", nargs="+", default=list(spec.JACOBIAN_KINDS), choices=spec.JACOBIAN_KINDS)
    directions = ["forward", "reverse"]
    parser.add_argument("--directions", nargs="+", default=directions, choices=directions)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    return parser.parse_args(argv)


def contractive_system(kind, length, batch, width, device):
    """``A`` (full: ``randn / (1.5 sqrt(w))``, diag: uniform in (-0.9, 0.9), identity: None), ``c``."""
    generator = torch.Generator(device=device).manual_seed(0)
    c = torch.randn(length, batch, width, device=device, generator=generator)
    if kind == "full":
        A = torch.randn(length, batch, width, width, device=device, generator=generator)
        return A / (1.5 * width**0.5), c
    if kind == "diag":
        return torch.rand(length, batch, width, device=device, generator=generator) * 1.8 - 0.9, c
    return None, c


def torch_path_only():
    """Context in which :func:`pcr.solve_affine_recurrence` takes its torch path on CUDA too."""
    return mock.patch.object(triton_pcr, "available", lambda: False)


def time_case(kind, reverse, length, width, batch, *, timer, compile_torch, device="cuda"):
    """One table row: the three timings (``compiled`` None if skipped) and the Triton error."""
    A, c = contractive_system(kind, length, batch, width, device)
    y = triton_pcr.solve_affine_recurrence(A, c, kind, reverse=reverse)
    row = {"triton": timer(lambda: triton_pcr.solve_affine_recurrence(A, c, kind, reverse=reverse))}
    with torch_path_only():
        expected = pcr.solve_affine_recurrence(A, c, kind, reverse=reverse)
        row["torch"] = timer(lambda: pcr.solve_affine_recurrence(A, c, kind, reverse=reverse))
        row["compiled"] = None
        if compile_torch:
            torch._dynamo.reset()  # a fresh compile per shape, clear of the recompile limit
            compiled = torch.compile(pcr.solve_affine_recurrence, dynamic=False)
            compiled(A, c, kind, reverse=reverse)
            row["compiled"] = timer(lambda: compiled(A, c, kind, reverse=reverse))
    row["error"] = ((y - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    return row


def format_row(kind, reverse, length, width, batch, row):
    def ms(value):
        return "-" if value is None else f"{value:.3f}"

    def ratio(value):
        return "-" if value is None else f"{value / row['triton']:.2f}x"

    cells = (
        kind, "reverse" if reverse else "forward", length, width, batch,
        ms(row["triton"]), ms(row["torch"]), ms(row["compiled"]),
        ratio(row["torch"]), ratio(row["compiled"]), f"{row['error']:.1e}",
    )
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available() or not triton_pcr.available():
        print("gpu_pcr: no CUDA device (or no Triton); nothing to time.")
        return 0
    import triton.testing

    def timer(fn):
        return triton.testing.do_bench(fn, return_mode="median")

    print(f"device: {torch.cuda.get_device_name()}, float32, medians of triton.testing.do_bench\n")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for kind in args.kinds:
        for reverse in (direction == "reverse" for direction in args.directions):
            for length in args.lengths:
                for width in args.widths:
                    for batch in args.batches:
                        row = time_case(kind, reverse, length, width, batch,
                                        timer=timer, compile_torch=not args.no_compile)
                        print(format_row(kind, reverse, length, width, batch, row), flush=True)
                        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
