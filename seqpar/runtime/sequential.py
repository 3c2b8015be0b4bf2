"""The exact sequential evaluation of a chain: the reference every solve must equal."""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.utils._pytree as pytree

from . import dense_step, fused_loop
from .rolled import loop_for
from .stats import SolveStats

log = logging.getLogger("seqpar.runtime")


def run_steps(program, state, xs_leaves, shared, start: int = 0) -> torch.Tensor:
    """``s_l = f(s_{l-1}, x_l)`` for ``l = start + 1 .. L`` from the packed ``state`` ``(N, w)`` (``s_start``).

    ``xs_leaves``: the per-step inputs stacked, ``(L, ...)`` each. Returns
    ``(L - start, N, w)``; out of place, so autograd can record it.
    """
    return run_columns(program, state, [leaf.unbind(0) for leaf in xs_leaves], shared, start)


def run_columns(program, state, columns, shared, start: int = 0, recorded: bool | None = None) -> torch.Tensor:
    """:func:`run_steps` on per-step inputs given as columns: ``columns[i][l]`` is leaf ``i`` of ``x_{l+1}``.

    A column is any sequence of ``L`` tensors: the rows of a stacked tensor,
    or the per-layer parameters themselves, read where they are (no copy).
    The loop is the step's aten calls written out once (:mod:`.rolled`), so
    the states are those of the user's step, run one after another; where it
    cannot be generated the step itself is called per step, on unpacked
    states, exactly as in the original loop. ``recorded``: whether autograd
    may record the loop (default: grad mode); where it does not, the states
    are written into one buffer (``out=`` and in-place forms of the step's
    last ops: the same kernels, no allocation per step).
    """
    return run_loop(program, state, columns, shared, start, recorded, compiled=False)[0]


def run_loop(program, state, columns, shared, start, recorded, compiled: bool, stop: int | None = None):
    """``(states, how)``: :func:`run_columns` for the steps ``start + 1 .. stop`` (default ``L``), or where
    ``compiled`` allows it, the compiled C loop of a small dense layer (:mod:`.dense_step`; ``how``
    ``"compiled"``) or for a program built with ``loop="fused"`` its step compiled by inductor where that was
    timed faster (:mod:`.fused_loop`; ``"fused"``), else the loop's kind."""
    stop = program.length if stop is None else stop
    if start >= stop:
        return state.new_empty(0, *state.shape), ""
    loop = loop_for(program, state, columns, shared)
    recorded = torch.is_grad_enabled() if recorded is None else recorded
    if not recorded and (loop.run_into is not None or compiled):
        out = state.new_empty(stop - start, *state.shape)
        if compiled and dense_step.usable(loop.dense, state):
            if dense_step.run(loop.dense, state, columns, shared, start, stop, out) is not None:
                return out, "compiled"
        if compiled and program.loop == "fused":
            how = fused_loop.run_into(program, state, columns, shared, start, out, loop.run_into)
            if how is not None:
                return out, how if how == "fused" else loop.kind
        if loop.run_into is not None:
            return loop.run_into(state, columns, shared, start, stop, out), loop.kind
    if loop.run is not None:
        return torch.stack(loop.run(state, columns, shared, start, stop)), loop.kind
    layout = program.layout
    current = layout.unpack(state)
    trajectory = []
    xs_leaves = [torch.stack(list(column[start:stop])) for column in columns]
    for x in program.input_trees(xs_leaves, 0, stop - start):
        current = program.step(current, x, *shared)
        trajectory.append(current)
    return layout.pack(pytree.tree_map(lambda *parts: torch.stack(parts), *trajectory)), loop.kind


def continue_sequentially(program, s0, xs_leaves, shared, states, start: int) -> None:
    """``states[start:]`` (0-based; ``s_{start+1} .. s_L``) by the sequential loop, in place."""
    if start < program.length:
        states[start:] = run_steps(program, s0 if start == 0 else states[start - 1], xs_leaves, shared, start)


def redo_if_not_finite(program, s0, xs_leaves, shared, states, stats, solve: str) -> None:
    """After a one-pass solve (``solve`` names it): where ``states`` hold a NaN or an infinity (they reach the
    extremes), all of them by the sequential loop, in place, and ``stats`` say why."""
    if bool(torch.isfinite(torch.stack(torch.aminmax(states))).all()):
        return
    stats.converged, stats.residual = False, math.inf
    stats.fallback = f"non-finite values in {solve}"
    log.info("chain of %d steps: %s; solved sequentially", program.length, stats.fallback)
    continue_sequentially(program, s0, xs_leaves, shared, states, 0)
    stats.sequential_steps = program.length
    stats.evaluations += program.length


def solve_sequentially(program, s0, xs_leaves, shared, reason: str):
    """All states by the sequential loop; the stats record ``reason`` as the fallback."""
    return solve_columns(program, s0, [leaf.unbind(0) for leaf in xs_leaves], shared, reason)


def solve_columns(program, s0, columns, shared, reason: str, recorded: bool | None = None, compiled: bool = False):
    """:func:`solve_sequentially` on per-step columns (:func:`run_columns`); the stats also record how
    the steps ran (``loop``: ``"generated"``, ``"step calls"`` or ``"compiled"``) and the loop's wall time
    (``seconds``, measured on this call). ``compiled``: whether a small dense step may run as the compiled
    C loop (:mod:`.dense_step`), whose rounding differs from eager's kernels."""
    begin = time.perf_counter()
    states, how = run_loop(program, s0, columns, shared, 0, recorded, compiled)
    return states, sequential_stats(program, reason, how, time.perf_counter() - begin)


def sequential_stats(program, reason: str, how: str, seconds: float) -> SolveStats:
    """The stats of a chain solved by its sequential loop (``how`` it ran, in ``seconds``; ``reason``: why)."""
    return SolveStats(length=program.length, jacobian="none", converged=True, fallback=reason,
                      sequential_steps=program.length, evaluations=program.length, loop=how, seconds=seconds)
