"""When does a chain split over ``P`` devices beat pipelining? A model from measured per-iteration costs (issue 15 §3).

    .venv/bin/python benchmarks/distributed_model.py            # about a minute

Measured here, in one process and one thread (the costs a rank pays for its share of the chain):

* ``t_step``: eager's time per step, forward and forward + backward (the sequential chain, and what one pipeline
  stage pays per layer for one sample);
* ``K``: Newton iterations of ``seqpar.solve_chain`` on the chain, and ``c_fwd``: its forward time per position
  per iteration (``T_solve / (K L)``); ``c_bwd``: its adjoint's time per position (one Jacobian evaluation, two
  reverse solves and one batched VJP);
* ``alpha``: the latency of one all-gather of a small row between 2 gloo ranks on this CPU.

The model, for ``L`` steps over ``P`` ranks, one sample (batch 1: what pipelining cannot overlap):

* sequential: ``T_seq = L t_step``;
* pipelining (one microbatch: the sample walks the stages in turn): ``T_pipe = L t_step + (P - 1) alpha_p2p``;
* seqpar.distributed forward: ``T_fwd = (K + 1) (L/P c_fwd + t_ag) + 2 t_ag`` (one all-gather per iteration,
  convergence seen one exchange late; one to agree on the call's arguments, one broadcast of the output);
  training adds ``L/P c_bwd + 2 t_ag`` (the adjoint's maps, the gradients of ``s0``);
* ``t_ag = (P - 1) (alpha_hop + n / beta)``: a ring all-gather of ``P`` rows of ``n`` bytes
  (``n = 8 (N (w^2 + w) + 3)`` for dense blocks: the map and the status).

Two communication settings: ``alpha_hop`` = the measured gloo latency on this CPU, and an NCCL-like
``alpha_hop = 10 us``, ``beta = 100 GB/s`` (assumed figures for GPUs linked by NVLink/InfiniBand, not measured
here). Compute per position is this CPU core's; a GPU's would be lower for both the sequential step (launch
bound, ~10 us a layer) and the batched positions, so the table shows the shape of the trade-off, not GPU times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import seqpar  # noqa: E402
from seqpar.testing.ranks import run_ranks  # noqa: E402
from timing import median_time  # noqa: E402


def mlp_case(length, width=8):
    torch.manual_seed(0)
    weights = torch.randn(length, width, width) / width**0.5
    biases = torch.randn(length, width) * 0.1
    s0 = torch.randn(1, width)

    def step(s, x):
        return torch.tanh(torch.nn.functional.linear(s, x[0], x[1]))

    return f"MLP (Linear({width}, {width}), Tanh)", step, s0, (weights, biases), (), width


def gru_case(length, hidden=16):
    torch.manual_seed(0)
    cell = nn.GRUCell(hidden, hidden)
    xs = torch.randn(length, 1, hidden)
    s0 = torch.zeros(1, hidden)
    shared = tuple(cell.parameters())

    def step(s, x, w_ih, w_hh, b_ih, b_hh):
        return torch._VF.gru_cell(x, s, w_ih, w_hh, b_ih, b_hh)

    return f"GRU cell (hidden {hidden})", step, s0, xs, shared, hidden


def loop(step, s0, xs, shared):
    """The chain by the plain loop; the per-step inputs unbound once (one backward node, not ``L`` slices)."""
    columns = list(zip(*(leaf.unbind(0) for leaf in xs))) if isinstance(xs, tuple) else xs.unbind(0)
    s, states = s0, []
    for x in columns:
        s = step(s, x, *shared)
        states.append(s)
    return torch.stack(states)


def costs(case, length, repeats):
    """``t_step`` (forward, training), ``K``, ``c_fwd``, ``c_bwd`` of one case on this core, in seconds."""
    name, step, s0, xs, shared, width = case(length)
    leaves = list(xs) if isinstance(xs, tuple) else [xs]
    trainable = [t.detach().clone().requires_grad_() for t in (*leaves, *shared)]

    def differentiable():
        train_xs = tuple(trainable[:len(leaves)]) if isinstance(xs, tuple) else trainable[0]
        return train_xs, tuple(trainable[len(leaves):])

    with torch.no_grad():
        sequential = median_time(lambda: loop(step, s0, xs, shared), repeats)
        solve = median_time(lambda: seqpar.solve_chain(step, s0, xs, shared), repeats)
        _, stats = seqpar.solve_chain(step, s0, xs, shared, return_stats=True)

    def train_loop():
        train_xs, train_shared = differentiable()
        loop(step, s0, train_xs, train_shared).sum().backward()

    def train_solve():
        train_xs, train_shared = differentiable()
        seqpar.solve_chain(step, s0, train_xs, train_shared).sum().backward()

    train_sequential = median_time(train_loop, repeats)
    train = median_time(train_solve, repeats)
    return dict(name=name, width=width, batch=s0.shape[0], t_step=sequential / length,
                t_step_train=train_sequential / length, iterations=stats.iterations,
                c_fwd=solve / (stats.iterations * length), c_bwd=max(train - solve, 0.0) / length)


def gather_latency(rank, world, repeats):
    import torch.distributed as dist

    row = torch.zeros(16, dtype=torch.float64)
    out = torch.empty(world * 16, dtype=torch.float64)
    for _ in range(20):
        dist.all_gather_single(out, row)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_gather_single(out, row)
    return (time.perf_counter() - start) / repeats


def predicted(measured, length, ranks, alpha_hop, beta):
    """``(T_seq, T_pipe, T_fwd, T_seq_train, T_train)`` in seconds for ``length`` steps over ``ranks`` ranks."""
    width, batch, K = measured["width"], measured["batch"], measured["iterations"]
    row_bytes = 8 * (batch * (width * width + width) + 3)
    t_ag = (ranks - 1) * (alpha_hop + row_bytes / beta)
    sequential = length * measured["t_step"]
    pipelined = sequential + (ranks - 1) * alpha_hop
    forward = (K + 1) * (length / ranks * measured["c_fwd"] + t_ag) + 2 * t_ag
    train_sequential = length * measured["t_step_train"]
    train = forward + length / ranks * measured["c_bwd"] + 2 * t_ag
    return sequential, pipelined, forward, train_sequential, train


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=1024, help="steps of the measured chains")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gloo = statistics.median(run_ranks(gather_latency, 2, 200))
    settings = [(f"gloo on this CPU (alpha {gloo * 1e6:.0f} us, measured)", gloo, 1e9),
                ("NCCL-like (alpha 10 us, 100 GB/s, assumed)", 10e-6, 100e9)]
    print(f"torch {torch.__version__}, 1 thread; chains of {args.length} steps, batch 1, float32\n")
    for case in (mlp_case, gru_case):
        measured = costs(case, args.length, args.repeats)
        print(f"**{measured['name']}**: t_step {measured['t_step'] * 1e6:.2f} us (training "
              f"{measured['t_step_train'] * 1e6:.2f} us), K = {measured['iterations']} iterations, c_fwd "
              f"{measured['c_fwd'] * 1e6:.3f} us, c_bwd {measured['c_bwd'] * 1e6:.3f} us per position\n")
        for label, alpha, beta in settings:
            print(f"{label}: speed-up over the sequential chain, forward (training)\n")
            print("| L | P | pipelining | seqpar.distributed forward | training |")
            print("|---|---|---|---|---|")
            for length in (1024, 8192, 65536):
                for ranks in (1, 2, 8, 16, 32, 64):
                    seq, pipe, fwd, seq_train, train = predicted(measured, length, ranks, alpha, beta)
                    print(f"| {length} | {ranks} | {seq / pipe:.2f} | {seq / fwd:.2f} | {seq_train / train:.2f} |")
            print()


if __name__ == "__main__":
    main()
