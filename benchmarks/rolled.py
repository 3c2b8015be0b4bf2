"""Chains kept sequential (the rolled form) against eager, and against inductor's unrolled code (issue 11 §2).

    .venv/bin/python benchmarks/rolled.py                 # about 5 minutes on a 2-core CPU
    .venv/bin/python benchmarks/rolled.py --quick         # the three rows of the issue

Forward passes under ``torch.no_grad``, float32, one thread. Every row
compiles a fresh model with ``torch.compile(model, backend="seqpar",
options=...)`` so that its chain runs in the rolled form (the chain op
looping over the step, ``seqpar.runtime.rolled``): the MLP rows with
``sequential_form="rolled"`` and the default policy (the issue's rows are
kept sequential by the cost model or, at gain 3, by the Lyapunov probe), the
hand-written LSTM rows with the default options (kept sequential for cost,
contractive: the loop may run the step compiled by inductor,
``seqpar.runtime.fused_loop``), the
zoo rows (``seqpar/testing/models.py``) with ``policy="sequential"``,
``sequential_form="rolled"`` and ``inner="eager"`` (what is timed is the
rolled chain, not inductor on the rest of the graph). ``inductor`` is
``torch.compile(model)`` (the unrolled graph; rows with a compile time only).
seqpar is timed after its speed trials have decided (``timing.past_trials``).

Times: medians of ``--repeats`` interleaved turns (eager, seqpar, inductor
one after another, each turn about 2 ms of calls), so load that comes and
goes falls on all alike. ``eager/seqpar`` > 1: seqpar is faster;
``seqpar/inductor`` <= 1.5 is the issue's target where inductor beats eager.
``eager/dynamo``: eager over ``torch.compile(model, backend="eager")`` (the
unrolled graph run by eager kernels): the ratio every backend is bounded by
where the steps cost next to nothing, since it pays Dynamo's per-call
guards and frame too.
``per step``: what ``seqpar.explain`` reports for the chain (the loop's wall
time on the last call over L, measured). The machine's load average is
printed before and after.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from seqpar.backend import SeqparBackend
from seqpar.testing import models as zoo
from timing import interleaved_medians, past_trials

# (L, w, B, gain, time inductor's unrolled code): the three rows and the grid around them.
MLP_ROWS = [
    (16, 8, 16, 1.0, True),
    (64, 2, 1, 1.0, True),
    (64, 16, 64, 1.0, True),
    (256, 32, 16, 1.0, False),
    (512, 8, 1, 3.0, False),
    (1024, 16, 1, 1.0, False),
]
QUICK_ROWS = [(64, 16, 64, 1.0, False), (256, 32, 16, 1.0, False), (512, 8, 1, 3.0, False)]
# (L, hidden, B, time inductor's unrolled code): a hand-written LSTM cell (seqpar.testing.models.hand_lstm, every
# h_t read) kept sequential for cost with the default options: its loop may run the step compiled by inductor.
LSTM_ROWS = [(128, 32, 1, True), (256, 32, 1, False), (256, 128, 8, False)]
ZOO_ROWS = {
    "deep_mlp gelu (16)": lambda: zoo.deep_mlp(depth=16, width=8, act="gelu"),
    "deep_mlp gelu (128)": lambda: zoo.deep_mlp(depth=128, width=8, act="gelu"),
    "mlp_layernorm (8)": lambda: zoo.mlp_layernorm(),
    "modulelist_mlp (12)": lambda: zoo.modulelist_mlp(),
    "stacked_mlp (8)": lambda: zoo.stacked_mlp(),
    "residual_mlp (10)": lambda: zoo.residual_mlp(),
    "residual_mlp (64)": lambda: zoo.residual_mlp(depth=64),
    "conv_resnet (6)": lambda: zoo.conv_resnet(),
    "preln_transformer (6)": lambda: zoo.preln_transformer(),
    "transformer_stack (6)": lambda: zoo.transformer_stack(),
    "gru_cell_loop (16)": lambda: zoo.gru_cell_loop(),
    "hand_lstm (16)": lambda: zoo.hand_lstm(),
    "weight_tied_loop (10)": lambda: zoo.weight_tied_loop(),
    "scanned_mlp (16)": lambda: zoo.scanned_mlp(),
    "scan_lstm (12)": lambda: zoo.scan_lstm(),
}


def mlp(length: int, width: int, gain: float) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for _ in range(length):
        linear = nn.Linear(width, width)
        nn.init.normal_(linear.weight, std=gain / width**0.5)
        layers += [linear, nn.Tanh()]
    return nn.Sequential(*layers).eval()


def measure(name: str, model, inputs, options: dict, inductor: bool, repeats: int) -> str:
    torch._dynamo.reset()
    backend = SeqparBackend(options)
    compiled = torch.compile(model, backend=backend)
    # Dynamo's own per-call cost, what every backend pays; on a copy of the model (as inductor's below), so that
    # each compiled function has its own Dynamo cache entry and no call checks another backend's guards.
    floor = torch.compile(copy.deepcopy(model), backend="eager")
    fns = {"eager": lambda: model(*inputs), "seqpar": lambda: compiled(*inputs), "dynamo": lambda: floor(*inputs)}
    compile_seconds = None
    with torch.no_grad():
        expected = model(*inputs)
        floor(*inputs)
        start = time.perf_counter()
        difference = _difference(compiled(*inputs), expected)
        seqpar_compile = time.perf_counter() - start
        past_trials(lambda: compiled(*inputs), backend)  # the speed trials (seqpar.speed, seqpar.runtime.fused_loop)
        if inductor:
            unrolled = torch.compile(copy.deepcopy(model))
            start = time.perf_counter()
            unrolled(*inputs)
            compile_seconds = time.perf_counter() - start
            fns["inductor"] = lambda: unrolled(*inputs)
        times = interleaved_medians(fns, repeats)
    chains = [chain for graph in backend.graphs for chain in graph.chains if chain.form]
    length = ", ".join(str(chain.length) for chain in chains) or "-"
    form = ", ".join(f"{chain.form}/{(chain.stats or {}).get('loop') or '-'}" for chain in chains) or "no chain"
    per_step = ", ".join(chain.step_cost.split(": ", 1)[-1].split(" (")[0] for chain in chains if chain.step_cost)
    eager, seqpar = times["eager"], times["seqpar"]
    cells = [name, length, form, f"{eager * 1e3:.3f}", f"{seqpar * 1e3:.3f}", f"**{eager / seqpar:.2f}**",
             f"{eager / times['dynamo']:.2f}"]
    if "inductor" in times:
        cells += [f"{times['inductor'] * 1e3:.3f}", f"{seqpar / times['inductor']:.2f}",
                  f"{compile_seconds:.1f} / {seqpar_compile:.1f}"]
    else:
        cells += ["-", "-", f"- / {seqpar_compile:.1f}"]
    cells += [per_step or "-", f"{difference:.0e}"]
    torch._dynamo.reset()
    return "| " + " | ".join(cells) + " |"


def _difference(got, want) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(want)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the issue's three MLP rows only")
    parser.add_argument("--no-zoo", action="store_true")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, forward under no_grad; "
          f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| model | L | form/loop | eager ms | seqpar ms | eager/seqpar | eager/dynamo | inductor ms | seqpar/inductor | "
          "compile s (inductor / seqpar) | per step (explain) | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for length, width, batch, gain, inductor in QUICK_ROWS if args.quick else MLP_ROWS:
        name = f"MLP w={width} B={batch} gain {gain:g}"
        x = torch.randn(batch, width)
        print(measure(name, mlp(length, width, gain), (x,), {"sequential_form": "rolled"}, inductor, args.repeats),
              flush=True)
    if not args.quick:
        for length, hidden, batch, inductor in LSTM_ROWS:
            model, inputs = zoo.hand_lstm(steps=length, inputs=hidden, hidden=hidden, batch=batch, outputs="all")
            print(measure(f"hand LSTM h={hidden} B={batch}", model, inputs, {}, inductor, args.repeats), flush=True)
    if not (args.quick or args.no_zoo):
        options = {"policy": "sequential", "sequential_form": "rolled", "inner": "eager", "min_chain": 4}
        for name, make in ZOO_ROWS.items():
            model, inputs = make()
            print(measure(name, model, inputs, options, False, args.repeats), flush=True)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{time.perf_counter() - began:.0f} s in all")


if __name__ == "__main__":
    main()
