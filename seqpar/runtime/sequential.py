"""The exact sequential evaluation of a chain: the reference every solve must equal."""

from __future__ import annotations

import torch

from .newton import SolveStats


def continue_sequentially(program, s0, xs_leaves, shared, states, start: int) -> None:
    """``s_l = f(s_{l-1}, x_l)`` for ``l > start`` (0-based ``states[start:]``), in place."""
    current = s0 if start == 0 else states[start - 1]
    for index in range(start, program.length):
        current = program.step_sequential(index, current, xs_leaves, shared)
        states[index] = current


def solve_sequentially(program, s0, xs_leaves, shared, reason: str):
    """All states by the sequential loop; the stats record ``reason`` as the fallback."""
    states = s0.new_empty(program.length, *s0.shape)
    continue_sequentially(program, s0, xs_leaves, shared, states, 0)
    stats = SolveStats(length=program.length, jacobian="none", converged=True, fallback=reason,
                       sequential_steps=program.length)
    return states, stats
