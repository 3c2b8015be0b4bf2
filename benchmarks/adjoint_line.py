"""The policy's diagonal-adjoint line in one process: a zoo model's training step with the line at 1024 values
per step (session 17: wider chains took the sequential adjoint) and at 4096 (the runs of session 18), and eager.

    cd benchmarks && ../.venv/bin/python adjoint_line.py rwkv 4 1024     # family, batch, sequence

2 threads, float32, train mode; each seqpar model is warmed up past its speed trials, then the three are timed in
interleaved turns (one call each, medians of 3).
"""
import copy
import sys
import time

import torch

from recurrent_models import FAMILIES, hidden_states, training_step
from timing import interleaved_medians, past_trials

from seqpar.backend import SeqparBackend
from seqpar.passes import policy

LINES = {"line 1024": 1024, "line 4096": 4096}


def main():
    family, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = FAMILIES[family]().train()
    ids = torch.randint(0, 1000, (batch, seq))
    steps = {"eager": training_step(hidden_states(model), ids)}
    for name, line in LINES.items():
        policy.CPU_DIAGONAL_ADJOINT_MAX_WORK = line  # read when the graph compiles, on its first call
        backend = SeqparBackend({"policy": "auto"})
        steps[name] = training_step(torch.compile(hidden_states(copy.deepcopy(model)), backend=backend), ids)
        start = time.perf_counter()
        calls = past_trials(steps[name], backend)
        adjoints = [chain.adjoint for graph in backend.graphs for chain in graph.chains]
        kept = [graph.speed.kept for graph in backend.graphs if graph.speed is not None]
        print(f"{name}: first {calls} calls (compile, speed trial) {time.perf_counter() - start:.0f} s; "
              f"adjoints {adjoints}; form kept {kept}", flush=True)
    times = interleaved_medians(steps, 3, budget=0.0, warmup=1)
    for name, seconds in times.items():
        print(f"{family} batch {batch} seq {seq} {name}: {seconds * 1e3:.0f} ms ({times['eager'] / seconds:.2f}x eager)")


if __name__ == "__main__":
    main()
