"""The exact sequential evaluation of a chain: the reference every solve must equal."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from .stats import SolveStats


def continue_sequentially(program, s0, xs_leaves, shared, states, start: int) -> None:
    """``s_l = f(s_{l-1}, x_l)`` for ``l > start`` (0-based ``states[start:]``), in place.

    The user's step runs on unpacked states exactly as in the original loop;
    the states are packed once at the end.
    """
    layout = program.layout
    state = layout.unpack(s0 if start == 0 else states[start - 1])
    trajectory = []
    for x in program.per_step_inputs(xs_leaves, start):
        state = program.step(state, x, *shared)
        trajectory.append(state)
    if trajectory:
        stacked = pytree.tree_map(lambda *parts: torch.stack(parts), *trajectory)
        states[start:] = layout.pack(stacked)


def solve_sequentially(program, s0, xs_leaves, shared, reason: str):
    """All states by the sequential loop; the stats record ``reason`` as the fallback."""
    states = s0.new_empty(program.length, *s0.shape)
    continue_sequentially(program, s0, xs_leaves, shared, states, 0)
    stats = SolveStats(length=program.length, jacobian="none", converged=True, fallback=reason,
                       sequential_steps=program.length, evaluations=program.length)
    return states, stats
