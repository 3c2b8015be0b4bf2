"""Compile every Triton kernel specialisation for sm_80 and sm_90 on this machine (no GPU needed).

Prints two markdown tables: a summary per kernel, kind and target (specialisations, failures, the
most registers, how many spill, the most shared memory, compile seconds), then one row per
specialisation and target (registers per thread and spill bytes from ``ptxas -v``, shared memory
from the compiled metadata, compile seconds; spills flagged). The enumeration and the compile are
:mod:`seqpar.runtime.kernels.triton_aot`. Run without ``TRITON_INTERPRET``:

    python benchmarks/triton_aot.py [--jobs 2] [--target sm_90] [--subset representative]
    python benchmarks/triton_aot.py --results results.jsonl   # the JSON lines of
        # python -m seqpar.runtime.kernels.triton_aot, tabulated without compiling again
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import triton

from seqpar.runtime.kernels import triton_aot


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", choices=sorted(triton_aot.TARGETS), help="default: all")
    parser.add_argument("--subset", choices=("all", "representative"), default="all")
    parser.add_argument("--jobs", type=int, default=1, help="compiling processes")
    parser.add_argument("--results", help="JSON lines of python -m seqpar.runtime.kernels.triton_aot to tabulate")
    return parser.parse_args(argv)


def summary_rows(results):
    """One row per (kernel, kind, target): the worst of its specialisations."""
    groups = {}
    for result in results:
        groups.setdefault((result.kernel, result.label.split()[0], result.target), []).append(result)
    for (kernel, kind, target), group in groups.items():
        compiled = [r for r in group if r.error is None]
        yield (kernel, kind, target, len(group), len(group) - len(compiled),
               max((r.registers or 0 for r in compiled), default="-"),
               sum(r.spills for r in compiled),
               max((r.shared for r in compiled), default="-"),
               f"{sum(r.seconds for r in group):.1f}")


def detail_row(result):
    if result.error is not None:
        first_line = result.error.splitlines()[0][:120].replace("|", "/")
        return (result.kernel, result.label, result.target, "FAILED", first_line, "-", f"{result.seconds:.2f}")
    spills = f"{result.spill_stores} / {result.spill_loads}"
    if result.spills:
        spills = f"**SPILLS {spills}**"
    return (result.kernel, result.label, result.target, result.registers, spills, result.shared,
            f"{result.seconds:.2f}")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def compile_here(args):
    """``(results, specialisations, targets, wall seconds)`` of compiling on this machine."""
    reason = triton_aot.unavailable_reason()
    if reason is not None:
        sys.exit(f"cannot compile here: {reason}")
    specs = triton_aot.specialisations()
    if args.subset == "representative":
        specs = triton_aot.representative(specs)
    targets = tuple(args.target or triton_aot.TARGETS)
    start = time.perf_counter()
    results = []
    for result in triton_aot.iter_compile(specs, targets, args.jobs):
        results.append(result)
        print(f"\r{len(results)} / {len(specs) * len(targets)} compiled", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return results, len(specs), targets, time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    if args.results:
        with open(args.results) as lines:
            results = [triton_aot.CompileResult(**json.loads(line)) for line in lines if line.startswith("{")]
        targets = tuple(dict.fromkeys(r.target for r in results))
        count, wall = len(results) // max(1, len(targets)), None
    else:
        results, count, targets, wall = compile_here(args)
    failed = sum(r.error is not None for r in results)
    spilling = sum(r.spills for r in results)
    timing = "" if wall is None else f"; {wall:.0f} s wall with {args.jobs} process(es)"
    print(f"triton {triton.__version__}: {count} specialisations x {len(targets)} targets = {len(results)} "
          f"compiles, {failed} failed, {spilling} spill{timing}\n")
    print(table(("kernel", "kind", "target", "specialisations", "failed", "max registers", "spilling",
                 "max shared bytes", "compile s"), summary_rows(results)))
    print()
    print(table(("kernel", "specialisation", "target", "registers", "spill bytes st / ld", "shared bytes",
                 "compile s"), map(detail_row, results)))


if __name__ == "__main__":
    main()
