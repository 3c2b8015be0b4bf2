"""The runtime's PCR driver on CPU: eager torch ops vs inductor's C++ for the same driver.

    python benchmarks/pcr_cpu_inductor.py [--L 1024 4096] [--w 2 4 8] [--kind full]

Times one forward solve of ``y_l = A_l y_{l-1} + c_l`` (float32, N = 1) with
``seqpar.runtime.pcr.solve_affine_recurrence`` eagerly and compiled by
``torch.compile`` (inductor, static shapes: one compile per shape, timed too),
and prints which is faster per shape; also the CPU default since session 3,
the compiled substitution kernel (``method="auto"``).
"""

import argparse
import time

import torch

from seqpar.runtime.pcr import solve_affine_recurrence
from timing import median_time


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--L", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--w", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--kind", default="full", choices=["full", "diag", "identity"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| L | w | kind | eager PCR ms | inductor PCR ms | compile s | faster PCR | C substitution ms |")
    print("|---|---|---|---|---|---|---|---|")
    for length in args.L:
        for width in args.w:
            generator = torch.Generator().manual_seed(0)
            c = torch.randn(length, 1, width, generator=generator)
            shape = {"full": (length, 1, width, width), "diag": (length, 1, width)}.get(args.kind)
            A = None if shape is None else torch.randn(*shape, generator=generator) / (1.5 * width**0.5)
            torch._dynamo.reset()
            compiled = torch.compile(solve_affine_recurrence, dynamic=False)
            start = time.perf_counter()
            expected = solve_affine_recurrence(A, c, args.kind, method="pcr")
            got = compiled(A, c, args.kind, method="pcr")
            compile_s = time.perf_counter() - start
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
            eager_ms = 1e3 * median_time(lambda: solve_affine_recurrence(A, c, args.kind, method="pcr"), 20)
            inductor_ms = 1e3 * median_time(lambda: compiled(A, c, args.kind, method="pcr"), 20)
            substitution_ms = 1e3 * median_time(lambda: solve_affine_recurrence(A, c, args.kind), 20)
            faster = "inductor" if inductor_ms < eager_ms else "eager"
            print(f"| {length} | {width} | {args.kind} | {eager_ms:.3f} | {inductor_ms:.3f} | {compile_s:.1f} | {faster} "
                  f"| {substitution_ms:.3f} |", flush=True)


if __name__ == "__main__":
    main()
