"""Training steps under policy "auto": the speed trial times forward and backward (``seqpar.speed``).

    .venv/bin/python benchmarks/training_trial.py            # about 3 minutes on a 2-core CPU

One training step is ``loss = (model(x) ** 2).mean(); loss.backward()`` with the
parameters' gradients cleared first, float32. Every row compiles a fresh model
with ``torch.compile(model, backend="seqpar")`` (default options), runs
training steps until the graph's speed trial has decided (the rewritten graph
and the original one, alternating, each timed with its backward;
``timing.past_trials``), then times eager's and seqpar's steps in interleaved turns of
about 0.2 s of calls each (medians of ``--repeats`` turns' means: a step right
after the other form's runs up to 2x slower while the allocator's and caches'
state settles, a training loop's steady state is back-to-back steps). Reported: the trial's fastest call of each form,
the form it kept, and eager's step over seqpar's after the trial (> 1:
seqpar is faster). The machine's load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os

import torch

from seqpar.backend import SeqparBackend
from seqpar.speed import ORIGINAL, REWRITTEN
from seqpar.testing import models as zoo
from timing import interleaved_medians, past_trials

ROWS = {
    "deep_mlp tanh, 64 x 4, batch 4": lambda: zoo.deep_mlp(depth=64, width=4),
    "deep_mlp tanh, 1024 x 4, batch 1": lambda: zoo.deep_mlp(depth=1024, width=4, batch=1),
    "deep_mlp gelu, 128 x 64, batch 16": lambda: zoo.deep_mlp(depth=128, width=64, act="gelu", batch=16),
    "residual_mlp, 64 x 8": lambda: zoo.residual_mlp(depth=64),
    "hand_lstm, 256 steps, hidden 32, batch 1": lambda: zoo.hand_lstm(steps=256, hidden=32, batch=1),
    "gru_cell_loop, 256 steps, hidden 8": lambda: zoo.gru_cell_loop(steps=256),
}


def training_step(model, parameters, inputs):
    def step():
        for parameter in parameters:
            parameter.grad = None
        (model(*inputs) ** 2).mean().backward()
    return step


def measure(name: str, make, repeats: int) -> str:
    torch._dynamo.reset()
    model, inputs = make()
    model.train()
    parameters = list(model.parameters())
    backend = SeqparBackend({})
    compiled = torch.compile(model, backend=backend)
    past_trials(training_step(compiled, parameters, inputs), backend)
    times = interleaved_medians({"eager": training_step(model, parameters, inputs),
                                 "seqpar": training_step(compiled, parameters, inputs)}, repeats, budget=0.2)
    trials = [graph.speed for graph in backend.graphs if graph.speed is not None]
    chains = ", ".join(f"{chain.kind} {chain.length}: {chain.method}/{chain.adjoint}"
                       for graph in backend.graphs for chain in graph.chains if chain.form) or "no chain"
    trial = trials[0] if trials else None
    if trial is None or trial.kept is None:
        cells = ["-", "-", "no trial" if trial is None else trial.summary()]
    else:
        cells = [f"{trial.fastest(REWRITTEN) * 1e3:.2f}", f"{trial.fastest(ORIGINAL) * 1e3:.2f}", trial.kept]
    eager, seqpar = times["eager"], times["seqpar"]
    return "| " + " | ".join([name, chains, *cells, f"{eager * 1e3:.2f}", f"{seqpar * 1e3:.2f}",
                              f"**{eager / seqpar:.2f}**"]) + " |"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, load average {os.getloadavg()}\n")
    print("| model | chains (forward/adjoint) | trial: rewritten ms | trial: original ms | kept | "
          "eager step ms | seqpar step ms | eager/seqpar |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.rows:
        print(measure(name, ROWS[name], args.repeats), flush=True)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
