"""Compile time of a deep tanh MLP: seqpar vs inductor on the unrolled graph.

    python benchmarks/compile_time.py --depth 1024 [--skip-inductor] [--scan-layers] [--nested-region]

Each backend compiles a fresh model in a fresh Dynamo state. Two times per
backend: the first call (Dynamo's trace, the backend, the run) and the
backend alone (what seqpar changes: Dynamo's trace of the unrolled Python
loop is the same for both). Ratios are inductor / seqpar. ``--dynamo-only``
also times Dynamo alone (backend "eager"); ``--nested-region`` also times
blocks marked ``torch.compiler.nested_compile_region`` (Dynamo reuses the
block's trace: its own time falls by about 40%); ``--scan-layers`` also
times the same blocks as ``seqpar.scan_layers(blocks)`` (one ``scan`` over
stacked parameters: Dynamo traces one block). Every ratio is against
inductor on the unrolled graph, measured in the same run. Inductor's caches
are disabled: a cached graph from an earlier run would time a cache lookup.
"""

import argparse
import time

import torch
import torch.nn as nn

import seqpar
from seqpar.backend import seqpar_backend

FORMS = ("unrolled", "nested region", "scan_layers")


def timed(backend, seconds: list):
    """A backend that records how long ``backend`` takes to compile each graph."""

    def compile_graph(gm, example_inputs):
        start = time.perf_counter()
        compiled = backend(gm, example_inputs)
        seconds.append(time.perf_counter() - start)
        return compiled

    return compile_graph


class RegionBlock(nn.Sequential):
    """A block whose forward is a ``torch.compiler.nested_compile_region``: Dynamo traces its body once."""

    forward = torch.compiler.nested_compile_region(nn.Sequential.forward)


def first_call(depth: int, width: int, name: str, form: str = "unrolled") -> tuple[float, float]:
    """(first-call seconds, backend seconds) for a fresh ``depth``-layer model in ``form`` (one of FORMS).

    ``name``: "seqpar", "inductor", or "eager" (no compiler: the first call is Dynamo's own work).
    """
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = RegionBlock if form == "nested region" else nn.Sequential
    blocks = nn.Sequential(*[block(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)])
    model = seqpar.scan_layers(blocks) if form == "scan_layers" else blocks
    x = torch.randn(1, width)
    inner = seqpar_backend if name == "seqpar" else torch._dynamo.lookup_backend(name)
    backend_seconds = []
    compiled = torch.compile(model, backend=timed(inner, backend_seconds))
    start = time.perf_counter()
    with torch.no_grad():
        out = compiled(x)
    total = time.perf_counter() - start
    with torch.no_grad():
        error = float((out - blocks(x)).abs().max())
    print(f"  {name:8s} {form:13s} depth {depth}: first call {total:7.1f} s, backend {sum(backend_seconds):7.1f} s "
          f"(max |error| vs eager {error:.2e})", flush=True)
    return total, sum(backend_seconds)


def main():
    torch._inductor.config.force_disable_caches = True
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depth", type=int, nargs="+", default=[1024])
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--skip-inductor", action="store_true")
    parser.add_argument("--dynamo-only", action="store_true", help="also time the first call with backend='eager'")
    parser.add_argument(
        "--nested-region", action="store_true", help="seqpar (and eager) on blocks marked nested_compile_region"
    )
    parser.add_argument("--scan-layers", action="store_true", help="seqpar (and eager) on seqpar.scan_layers(blocks)")
    args = parser.parse_args()
    # scan_layers first: its row then also pays the process's first Dynamo start-up (conservative for it).
    forms = ["scan_layers"] * args.scan_layers + ["unrolled"] + ["nested region"] * args.nested_region
    rows = []
    for depth in args.depth:
        for form in forms if args.dynamo_only else ():
            first_call(depth, args.width, "eager", form)
        seqpar_times = {form: first_call(depth, args.width, "seqpar", form) for form in forms}
        inductor = None if args.skip_inductor else first_call(depth, args.width, "inductor")
        rows += [(depth, form, times, inductor) for form, times in seqpar_times.items()]
    print("\n| depth | model | seqpar first call / backend (s) | inductor, unrolled: first call / backend (s) "
          "| ratio first call | ratio backend |")
    print("|---|---|---|---|---|---|")
    for depth, form, (s_total, s_backend), inductor in rows:
        if inductor is None:
            print(f"| {depth} | {form} | {s_total:.1f} / {s_backend:.1f} | - | - | - |")
            continue
        i_total, i_backend = inductor
        print(f"| {depth} | {form} | {s_total:.1f} / {s_backend:.1f} | {i_total:.1f} / {i_backend:.1f} "
              f"| {i_total / s_total:.1f}x | {i_backend / s_backend:.1f}x |")


if __name__ == "__main__":
    main()
