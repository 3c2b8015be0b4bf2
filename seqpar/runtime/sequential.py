"""The exact sequential evaluation of a chain: the reference every solve must equal."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from .stats import SolveStats


def run_steps(program, state, xs_leaves, shared, start: int = 0) -> torch.Tensor:
    """``s_l = f(s_{l-1}, x_l)`` for ``l = start + 1 .. L`` from the packed ``state`` ``(N, w)`` (``s_start``).

    The user's step runs on unpacked states exactly as in the original loop;
    the states are packed once at the end: ``(L - start, N, w)``. Out of
    place, so autograd can record it.
    """
    layout = program.layout
    current = layout.unpack(state)
    trajectory = []
    for x in program.per_step_inputs(xs_leaves, start):
        current = program.step(current, x, *shared)
        trajectory.append(current)
    return layout.pack(pytree.tree_map(lambda *parts: torch.stack(parts), *trajectory))


def continue_sequentially(program, s0, xs_leaves, shared, states, start: int) -> None:
    """``states[start:]`` (0-based; ``s_{start+1} .. s_L``) by the sequential loop, in place."""
    if start < program.length:
        states[start:] = run_steps(program, s0 if start == 0 else states[start - 1], xs_leaves, shared, start)


def solve_sequentially(program, s0, xs_leaves, shared, reason: str):
    """All states by the sequential loop; the stats record ``reason`` as the fallback."""
    states = s0.new_empty(program.length, *s0.shape)
    continue_sequentially(program, s0, xs_leaves, shared, states, 0)
    stats = SolveStats(length=program.length, jacobian="none", converged=True, fallback=reason,
                       sequential_steps=program.length, evaluations=program.length)
    return states, stats
