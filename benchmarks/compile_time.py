"""Compile time of a deep tanh MLP: seqpar vs inductor on the unrolled graph.

    python benchmarks/compile_time.py --depth 1024 [--skip-inductor]

Each backend compiles a fresh model in a fresh Dynamo state. Two times per
backend: the first call (Dynamo's trace, the backend, the run) and the
backend alone (what seqpar changes: Dynamo's trace of the unrolled Python
loop is the same for both). Ratios are inductor / seqpar. Inductor's caches
are disabled: a cached graph from an earlier run would time a cache lookup.
"""

import argparse
import time

import torch
import torch.nn as nn

from seqpar.backend import seqpar_backend


def timed(backend, seconds: list):
    """A backend that records how long ``backend`` takes to compile each graph."""

    def compile_graph(gm, example_inputs):
        start = time.perf_counter()
        compiled = backend(gm, example_inputs)
        seconds.append(time.perf_counter() - start)
        return compiled

    return compile_graph


def first_call(depth: int, width: int, name: str) -> tuple[float, float]:
    """(first-call seconds, backend seconds) for a fresh ``depth``-layer model."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)])
    x = torch.randn(1, width)
    inner = seqpar_backend if name == "seqpar" else torch._dynamo.lookup_backend("inductor")
    backend_seconds = []
    compiled = torch.compile(model, backend=timed(inner, backend_seconds))
    start = time.perf_counter()
    with torch.no_grad():
        out = compiled(x)
    total = time.perf_counter() - start
    with torch.no_grad():
        error = float((out - model(x)).abs().max())
    print(f"  {name:8s} depth {depth}: first call {total:7.1f} s, backend {sum(backend_seconds):7.1f} s "
          f"(max |error| vs eager {error:.2e})", flush=True)
    return total, sum(backend_seconds)


def main():
    torch._inductor.config.force_disable_caches = True
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depth", type=int, nargs="+", default=[1024])
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--skip-inductor", action="store_true")
    args = parser.parse_args()
    rows = []
    for depth in args.depth:
        seqpar_times = first_call(depth, args.width, "seqpar")
        inductor_times = None if args.skip_inductor else first_call(depth, args.width, "inductor")
        rows.append((depth, seqpar_times, inductor_times))
    print("\n| depth | seqpar first call / backend (s) | inductor first call / backend (s) | ratio first call | ratio backend |")
    print("|---|---|---|---|---|")
    for depth, (s_total, s_backend), inductor in rows:
        if inductor is None:
            print(f"| {depth} | {s_total:.1f} / {s_backend:.1f} | - | - | - |")
            continue
        i_total, i_backend = inductor
        print(f"| {depth} | {s_total:.1f} / {s_backend:.1f} | {i_total:.1f} / {i_backend:.1f} "
              f"| {i_total / s_total:.1f}x | {i_backend / s_backend:.1f}x |")


if __name__ == "__main__":
    main()
