"""Time of chain detection on deep MLP graphs (issue 3: a 4000-node graph in under a second).

    python benchmarks/detect_time.py [--depth 1000 2000 4000] [--repeats 5]

The graphs are the ones Dynamo makes of ``nn.Sequential`` of ``depth`` x
(``Linear(4, 4)``, ``Tanh``), built directly (``seqpar.testing.models.mlp_graph``:
Dynamo itself needs about 20 s per 1000 layers): ``4 depth + 2`` nodes.
Reported: median seconds of ``seqpar.passes.detect.find_chains`` over ``--repeats``
runs, after one warm-up.
"""

from __future__ import annotations

import argparse

import torch

from seqpar.passes.detect import find_chains
from seqpar.testing.models import mlp_graph
from timing import median_time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| layers | graph nodes | chains found | detection s (median) |")
    print("|---|---|---|---|")
    for depth in args.depth:
        gm, _ = mlp_graph(depth, 4)
        chains, _ = find_chains(gm)
        seconds = median_time(lambda: find_chains(gm), args.repeats, warmup=0)
        found = ", ".join(f"{chain.kind} x {chain.length}" for chain in chains)
        print(f"| {depth} | {len(gm.graph.nodes)} | {found} | {seconds:.3f} |", flush=True)


if __name__ == "__main__":
    main()
