"""Where the milliseconds of one compiled call go: a deep ``nn.Sequential`` solved in parallel (issue 11 §2).

    .venv/bin/python benchmarks/call_overhead.py            # L = 4096: about 2-3 minutes (Dynamo traces 8192 modules)
    .venv/bin/python benchmarks/call_overhead.py --L 1024   # about 30 s

The model: ``L`` blocks ``(Linear(2, 2), Tanh)`` as one ``nn.Sequential``,
batch 1, float32, forward under ``torch.no_grad``, one thread; the backend's
default policy solves its chain in parallel (Newton + the CPU kernel). Each
line times one layer of the call, from the outside in (medians of
interleaved turns, ``benchmarks/timing.py``), so the differences between
consecutive lines are the costs of the layers:

* ``torch.compile(model, backend="seqpar")(x)``: the whole call;
* the same with ``options={"guard_filter_fn": torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe}``
  (torch's own opt-in: Dynamo drops its guards on the built-in modules and their parameters, so it will not
  notice a parameter replaced by one of another shape, dtype or ``requires_grad``);
* the backend's compiled function called directly with the graph's ``2L + 1``
  tensors: everything but Dynamo (guards on every parameter and module, the
  frame, its argument list);
* ``torch.ops.seqpar.chain_solve`` called directly: everything but the
  rewritten graph and the backend's wrapper;
* the op's Python body (``chain_solve``'s function): everything but the
  custom op's dispatch (autograd and backend wrappers, the alias check over
  ``2L + 1`` inputs, Dynamo's disable wrapper);
* ``per_step_inputs``: stacking the ``2L`` parameters into ``(L, 2, 2)`` and ``(L, 2)``;
* ``newton_solve`` on the stacked parameters: the solve itself;
* the op on the parameters stacked in the graph (two ``torch.stack`` calls
  and the op on two tensors, as the rewrite does for a standalone graph that
  autograd records): what handing the op ``2L`` tensors costs;
* ``seqpar.solve_chain`` on pre-stacked parameters: the solver's own API;
* ``torch.compile(seqpar.scan_layers(model), backend="seqpar")``: the same
  blocks as one scan over stacked parameters (two graph inputs).

Ratios are the eager loop's time over each. The issue's goal: the compiled
``nn.Sequential`` keeps at least half of the solver's own ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import seqpar  # noqa: E402
from seqpar.backend import SeqparBackend  # noqa: E402
from seqpar.runtime import ops  # noqa: E402
from seqpar.runtime.newton import newton_solve  # noqa: E402
from seqpar.runtime.sequential import run_columns  # noqa: E402
from timing import interleaved_medians  # noqa: E402


class Recording(SeqparBackend):
    """The backend, keeping the function it hands to Dynamo (to time it without Dynamo)."""

    def _wrap(self, original, compiled, record):
        self.run = super()._wrap(original, compiled, record)
        return self.run


def stacked_op(program, x, weights, biases):
    """What the rewritten graph would run if it stacked the layer parameters itself (as it does when the graph
    is standalone and autograd records the chain): two ``torch.stack`` calls, then the op on two tensors."""
    stacking = _STACKING.get(program)
    if stacking is None:
        stacking = _STACKING[program] = program.replace(param_slots=())
        ops.register_program(stacking)
    return torch.ops.seqpar.chain_solve.default(stacking.id, x, [torch.stack(weights), torch.stack(biases)], [], [])


_STACKING = weakref.WeakKeyDictionary()  # program -> its copy taking the stacks as per-step inputs


class UnguardedSequential(nn.Sequential):
    """The same blocks under another ``forward`` code object: Dynamo keeps its compiled entries per code object,
    so a stack compiled with fewer guards must not share them with the guarded one."""

    def forward(self, x):
        return super().forward(x)


def layer_step(s, params):
    weight, bias = params
    return torch.tanh(torch.nn.functional.linear(s, weight, bias))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--L", type=int, default=4096)
    parser.add_argument("--w", type=int, default=2)
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--sequential", action="store_true",
                        help="policy='sequential', sequential_form='rolled': the rolled loop instead of Newton")
    parser.add_argument("--recursive-dict-tags", action="store_true",
                        help="torch._dynamo.config.use_recursive_dict_tags_for_guards = True (Dynamo skips the guards "
                             "of module subtrees whose dicts did not change)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.recursive_dict_tags:
        torch._dynamo.config.use_recursive_dict_tags_for_guards = True
        torch._dynamo.config.max_saved_pointers_for_recursive_dict_tags_check = 4 * args.L + 64
    options = {"policy": "sequential", "sequential_form": "rolled"} if args.sequential else {}
    print(f"torch {torch.__version__}, {args.threads} thread(s), L={args.L} x (Linear({args.w}, {args.w}), Tanh), "
          f"batch {args.B}, float32, forward, options {options}, recursive dict tags {args.recursive_dict_tags}; "
          f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(args.L) for m in (nn.Linear(args.w, args.w), nn.Tanh())]).eval()
    x = torch.randn(args.B, args.w)
    params = list(model.parameters())
    weights, biases = params[0::2], params[1::2]

    backend = Recording(options)
    compiled = torch.compile(model, backend=backend)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(x)
    compile_seconds = time.perf_counter() - start
    unguarded = torch.compile(
        UnguardedSequential(*model), backend=SeqparBackend(options),
        options={"guard_filter_fn": torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe},
    )
    ((report, program),) = backend.graphs[0].programs
    graph_args = [params[0], params[1], x, *params[2:]]  # Dynamo's order: layer 0's parameters, the input, the rest
    layer_params = weights + biases
    stacked = (torch.stack(weights), torch.stack(biases))
    blocks = [nn.Sequential(model[i], model[i + 1]) for i in range(0, len(model), 2)]
    scanned = torch.compile(seqpar.scan_layers(blocks), backend=SeqparBackend(options))
    forward = "sequential" if args.sequential else "parallel"
    with torch.no_grad():
        scanned(x)
        unguarded(x)
        op_xs, op_params = ([], layer_params) if program.param_slots else (list(stacked), [])
        if report.form == "rolled":
            columns = ops.per_step_columns(program, op_xs, op_params)
            inner = {
                "per_step_columns (no copy)": lambda: ops.per_step_columns(program, op_xs, op_params),
                "the generated loop": lambda: run_columns(program, x, columns, [], recorded=False),
            }
        elif program.param_slots:
            leaves = ops.per_step_inputs(program, [], layer_params)
            inner = {
                "per_step_inputs (stack 2L parameters)": lambda: ops.per_step_inputs(program, [], layer_params),
                "newton_solve (stacked)": lambda: newton_solve(program, x, leaves, [], **program.solver_options),
            }
        else:  # the rewritten graph stacks the parameters itself (a standalone graph solved in parallel)
            inner = {
                "per_step_inputs (the graph's stacks, passed through)": lambda: ops.per_step_inputs(program, op_xs, []),
                "newton_solve (stacked)": lambda: newton_solve(program, x, op_xs, [], **program.solver_options),
            }
        unstacked_op = (
            {"stack in the graph + op on 2 stacked tensors": lambda: stacked_op(program, x, weights, biases)}
            if program.param_slots else {}
        )
        fns = {
            "eager loop": lambda: model(x),
            "torch.compile(backend='seqpar')": lambda: compiled(x),
            "torch.compile(backend='seqpar'), guard_filter_fn (inbuilt modules unguarded)": lambda: unguarded(x),
            "backend's compiled function (no Dynamo)": lambda: backend.run(*graph_args),
            "seqpar::chain_solve op": lambda: torch.ops.seqpar.chain_solve.default(program.id, x, op_xs, [], op_params),
            "the op's Python body": lambda: ops.chain_solve(program.id, x, op_xs, [], op_params),
            **inner,
            **unstacked_op,
            "seqpar.solve_chain (pre-stacked)": lambda: seqpar.solve_chain(layer_step, x, stacked, forward=forward),
            "scan_layers + backend": lambda: scanned(x),
        }
        times = interleaved_medians(fns, args.repeats, budget=20e-3)
    eager = times["eager loop"]
    iterations = f", {report.stats['iterations']} Newton iterations" if report.form == "solver" else ""
    print(f"chain: {report.form}, {report.method}/{report.adjoint}{iterations}; "
          f"first call (Dynamo + backend) {compile_seconds:.0f} s\n")
    print("| what is timed | ms | eager / this |")
    print("|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {eager / seconds:.2f} |")
    t = times
    (first, first_time), (second, second_time) = [(name, t[name]) for name in inner]
    layers = [
        ("Dynamo (guards on every parameter and module, the frame, 2L + 1 arguments)",
         t["torch.compile(backend='seqpar')"] - t["backend's compiled function (no Dynamo)"]),
        ("rewritten graph + backend wrapper (2L + 1 placeholders, the graph's stacks or the op's argument list)",
         t["backend's compiled function (no Dynamo)"] - t["seqpar::chain_solve op"]),
        ("custom-op dispatch (autograd/backend wrappers, alias check over 2L + 1 inputs)",
         t["seqpar::chain_solve op"] - t["the op's Python body"]),
        (first, first_time),
        (second, second_time),
        ("rest of the op's body", t["the op's Python body"] - first_time - second_time),
    ]
    print("\n| where the compiled call's time goes | ms | share |")
    print("|---|---|---|")
    total = t["torch.compile(backend='seqpar')"]
    for name, seconds in layers:
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / total:.0%} |")
    solver_ratio = eager / times["seqpar.solve_chain (pre-stacked)"]
    compiled_ratio = eager / times["torch.compile(backend='seqpar')"]
    unguarded_ratio = eager / times["torch.compile(backend='seqpar'), guard_filter_fn (inbuilt modules unguarded)"]
    print(f"\ncompiled nn.Sequential keeps {compiled_ratio / solver_ratio:.0%} of the solver's ratio "
          f"({compiled_ratio:.2f}x vs {solver_ratio:.2f}x; goal >= 50%); with the guard filter "
          f"{unguarded_ratio / solver_ratio:.0%} ({unguarded_ratio:.2f}x)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
