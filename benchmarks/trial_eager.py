"""Training steps too slow to time twice: eager's step is the speed trial's timed call of the original graph.

    .venv/bin/python benchmarks/trial_eager.py --family mamba --seq 4096 --batch 4 --steps 10

Where eager's training step takes an hour (Mamba's reference loop at 4096 steps: its backward makes a chain-sized
gradient of ``dA[:, :, i]`` at every step), ``recurrent_models.py``'s protocol, eager timed apart and seqpar
timed past its speed trial, runs that hour twice: the trial (policy ``"auto"``, :mod:`seqpar.speed`) runs the
original graph once itself. This script builds the model as ``recurrent_models.py`` does, runs seqpar's
training steps until the trial of the training graph has decided, and takes eager's time from the trial's call
of the original graph (the ops Dynamo traced, forward and backward, run as eager runs them: eager's computation
without the module's Python around it), then times ``--steps`` more seqpar steps (their median). Before it: the
forward under ``torch.no_grad`` once each, for seqpar's error (the hidden states' largest difference from
eager's over their scale) and its first call's time. Markdown to stdout.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from recurrent_models import FAMILIES, add_width_options, built, chain_decisions, hidden_states, training_step
from seqpar.backend import SeqparBackend
from seqpar.speed import ORIGINAL
from timing import past_trials


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="mamba", choices=list(FAMILIES))
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="seqpar's timed steps after the trial")
    parser.add_argument("--threads", type=int, default=2)
    add_width_options(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = built(args.family, args)
    ids = torch.randint(0, 1000, (args.batch, args.seq))
    backend = SeqparBackend({"policy": "auto"})
    solver_model = copy.deepcopy(model)
    compiled = torch.compile(hidden_states(solver_model), backend=backend)
    with torch.no_grad():
        start = time.perf_counter()
        solved = compiled(ids)
        first_call = time.perf_counter() - start
        reference = model(ids).last_hidden_state
        error = ((solved - reference).abs().max() / reference.abs().max()).item()
    solver_model.train()
    step = training_step(compiled, ids)
    graphs_before = len(backend.graphs)
    trial_calls = past_trials(step, backend, at_most=100)
    trials = [record.speed for record in backend.graphs[graphs_before:] if record.speed is not None]
    eager = [seconds for trial in trials for seconds in trial.times[ORIGINAL]]
    seqpar = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        seqpar.append(time.perf_counter() - start)
    median = statistics.median(seqpar)
    chains = chain_decisions(backend.graphs[graphs_before:])
    kept = ", ".join(str(trial.kept) for trial in trials) or "no trial"
    print(f"threads {args.threads}, float32, CPU, seqpar policy 'auto'\n")
    print("| family | batch | seq | training eager (the trial's original calls) | seqpar (median; min / max) | ratio "
          "| seqpar error | seqpar first call (forward) | trial calls | kept | chains |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    eager_cell = " / ".join(f"{seconds:.1f} s" for seconds in eager) or "not run"
    ratio = f"{min(eager) / median:.2f}x" if eager else "-"
    print(f"| {args.family} | {args.batch} | {args.seq} | {eager_cell} | {median:.2f} s ({min(seqpar):.2f} / "
          f"{max(seqpar):.2f}) | {ratio} | {error:.1e} | {first_call:.0f} s | {trial_calls} | {kept} | {chains} |")


if __name__ == "__main__":
    main()
