"""Recurrent modules through the backend: ``seqpar.scan_rnn(module)`` vs PyTorch's fused kernel.

    .venv/bin/python benchmarks/rnn_scan.py --T 256 1024 4096 --hidden 2 4 --modules LSTM GRU

For each module, sequence length T and hidden size H (one layer, batch 1, input
size 4, float32, one thread): the module run eagerly (PyTorch's fused
``aten::lstm`` / ``aten::gru`` CPU kernel, the baseline) against
``torch.compile(seqpar.scan_rnn(module), backend="seqpar")`` with the default
policy, in one run. Times: the forward under ``torch.no_grad`` and a training
step (forward + ``loss.backward()``), medians of ``--repeats`` calls after a
warm-up; the decision the policy took (forward / backward) and the largest
difference of the output from the module's. Markdown to stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import seqpar  # noqa: E402
from seqpar.backend import SeqparBackend  # noqa: E402
from timing import median_time, past_trials  # noqa: E402


def training_step(model, x):
    model.zero_grad(set_to_none=True)
    model(x)[0].square().sum().backward()


def row(module: str, steps: int, hidden: int, repeats: int) -> str:
    torch.manual_seed(0)
    rnn = getattr(nn, module)(4, hidden)
    x = torch.randn(steps, 1, 4)
    backend = SeqparBackend({})
    torch._dynamo.reset()
    compiled = torch.compile(seqpar.scan_rnn(rnn), backend=backend)
    with torch.no_grad():
        error = float((compiled(x)[0] - rnn(x)[0]).abs().max())
        forward_eager = median_time(lambda: rnn(x), repeats)
        past_trials(lambda: compiled(x), backend)  # seqpar.speed's trial first
        forward_seqpar = median_time(lambda: compiled(x), repeats)
    train_eager = median_time(lambda: training_step(rnn, x), repeats)
    past_trials(lambda: training_step(compiled, x), backend)
    train_seqpar = median_time(lambda: training_step(compiled, x), repeats)
    chains = [chain for graph in backend.graphs for chain in graph.chains]
    decision = ", ".join(sorted({f"{chain.method}/{chain.adjoint}" for chain in chains})) or "no chain"
    return (f"| {module} | {steps} | {hidden} | {decision} | {forward_eager * 1e3:.2f} | {forward_seqpar * 1e3:.2f} | "
            f"{forward_eager / forward_seqpar:.2f} | {train_eager * 1e3:.2f} | {train_seqpar * 1e3:.2f} | "
            f"{train_eager / train_seqpar:.2f} | {error:.1e} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--hidden", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--modules", nargs="+", default=["LSTM", "GRU"])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, float32, batch 1, input size 4\n")
    print("| module | T | H | seqpar fwd/bwd | eager forward ms | seqpar forward ms | forward ratio | "
          "eager train ms | seqpar train ms | train ratio | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for module in args.modules:
        for steps in args.T:
            for hidden in args.hidden:
                print(row(module, steps, hidden, args.repeats), flush=True)


if __name__ == "__main__":
    main()
