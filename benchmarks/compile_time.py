"""Compile time of a deep tanh MLP: seqpar vs inductor on the unrolled graph.

    python benchmarks/compile_time.py --depth 1024 [--skip-inductor]

Each backend compiles a fresh model in a fresh Dynamo state; the time is the
first call (trace + compile + run). The ratio is inductor / seqpar.
"""

import argparse
import time

import torch
import torch.nn as nn


def first_call_seconds(depth: int, width: int, backend: str, options=None) -> float:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)])
    x = torch.randn(1, width)
    compiled = torch.compile(model, backend=backend, options=options)
    start = time.perf_counter()
    with torch.no_grad():
        out = compiled(x)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        error = float((out - model(x)).abs().max())
    print(f"  {backend:8s} depth {depth}: {seconds:8.1f} s  (max |error| vs eager {error:.2e})", flush=True)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depth", type=int, nargs="+", default=[1024])
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--skip-inductor", action="store_true")
    args = parser.parse_args()
    rows = []
    for depth in args.depth:
        seqpar_s = first_call_seconds(depth, args.width, "seqpar")
        inductor_s = None if args.skip_inductor else first_call_seconds(depth, args.width, "inductor")
        rows.append((depth, seqpar_s, inductor_s))
    print("\n| depth | seqpar (s) | inductor (s) | inductor / seqpar |\n|---|---|---|---|")
    for depth, seqpar_s, inductor_s in rows:
        ratio = "-" if inductor_s is None else f"{inductor_s / seqpar_s:.1f}x"
        inductor_text = "-" if inductor_s is None else f"{inductor_s:.1f}"
        print(f"| {depth} | {seqpar_s:.1f} | {inductor_text} | {ratio} |")


if __name__ == "__main__":
    main()
