"""Max-plus chains in one pass: ``s_l = max(s_{l-1} + a_l, b_l)`` elementwise.

A step proven max-plus (:mod:`seqpar.runtime.structure`: RWKV's and xLSTM's
running maximum ``m_t = max(m_{t-1} + w, k_t)``) is affine in the max-plus
semiring (``max`` its addition, ``+`` its multiplication), so its chain is
the recurrence

    y_1 = f(s_0, x_1),    y_l = max(y_{l-1} + a_l, b_l),    l = 2..L,

with ``a_l``, ``b_l`` independent of the states, found by two batched
evaluations at all positions:

* ``b_l = f(-inf, x_l)``: every ``s + a`` branch is ``-inf`` (for ``a < +inf``)
  and the maxima pick ``b``; the same evaluation gives ``y_1`` at ``s_0``;
* ``a_l = f_a(0, x_l)``: ``f_a`` is the step's graph with every maximum that
  has a state-independent operand replaced by its state-dependent one
  (:func:`slope_graph`), which leaves ``s`` plus sums of state-independent
  values and maxima of such sums.

The recurrence is the sequential loop's arithmetic regrouped (``(s + a) + c``
becomes ``s + (a + c)``): exact up to rounding, like an affine chain's linear
solve. On CPU it runs in the compiled substitution (one pass over memory,
:func:`~seqpar.runtime.kernels.cpu_scan.maxplus`); elsewhere by recursive
doubling on the pairs ``(a, b)``: ``s -> max(s + a1, b1)`` followed by
``s -> max(s + a2, b2)`` is ``(a1 + a2, max(b1 + a2, b2))``, ``ceil(log2 L)``
steps of torch ops. Non-finite states (a ``+inf`` slope makes ``-inf + inf``
a NaN; a state that is itself infinite) send the chain to the sequential loop,
with the reason in the stats.
"""

from __future__ import annotations

import math

import torch

from .kernels import cpu_scan
from .sequential import redo_if_not_finite
from .stats import SolveStats
from .structure import is_maximum, state_dependent


def slope_graph(lowered: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``f_a``: the max-plus step ``lowered`` with each maximum that has a state-independent operand replaced by
    its state-dependent one; ``f_a(0, x_l) = a_l`` (module docstring)."""
    copied = torch.fx.Graph()
    copied.output(copied.graph_copy(lowered.graph, {}))
    copied.set_codegen(lowered.graph._codegen)  # the step's calling convention (pytree arguments)
    slopes = torch.fx.GraphModule(lowered, copied)
    _, dependent = state_dependent(slopes)
    for node in list(slopes.graph.nodes):
        if is_maximum(node) and node in dependent:
            operands = [arg for arg in node.args if isinstance(arg, torch.fx.Node) and arg in dependent]
            if len(operands) == 1:
                node.replace_all_uses_with(operands[0])
    slopes.graph.eliminate_dead_code()
    slopes.recompile()
    return slopes


def solve_maxplus_recurrence(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y_l = max(y_{l-1} + a_l, b_l)`` for ``l >= 1`` with ``y`` holding ``(y_0, b_1, .., b_{L-1})``, ``(L, N, w)``
    (``a_0`` unused); returns the solution (``y`` itself, updated, where the CPU kernel takes it)."""
    if cpu_scan.supports(a, y) and cpu_scan.available(y.dtype):
        return cpu_scan.maxplus(a, y.contiguous())
    slope, value = a.clone(), y.clone()
    distance = 1
    while distance < len(value):  # equation l absorbs equation l - d: (a, b) <- (a_{l-d} + a_l, max(b_{l-d} + a_l, b_l))
        value[distance:] = torch.maximum(value[:-distance] + slope[distance:], value[distance:])
        slope[distance:] = slope[:-distance] + slope[distance:]
        distance *= 2
    return value


def maxplus_solve(program, s0: torch.Tensor, xs_leaves, shared):
    """The chain of a max-plus step (``program.one_maxplus_solve``) in one pass (module docstring); returns
    ``(states (L, N, w), stats)`` like :func:`~seqpar.runtime.newton.newton_solve`."""
    length = program.length
    prev = s0.new_full((length, *s0.shape), -math.inf)
    prev[0] = s0
    values = program.steps_at(prev, xs_leaves, shared)  # (f(s_0, x_1), b_2, .., b_L)
    slopes = program.maxplus_slopes(torch.zeros_like(prev), xs_leaves, shared)
    states = solve_maxplus_recurrence(slopes, values)
    stats = SolveStats(
        length=length, jacobian=program.jacobian, iterations=1, converged=True, residual=0.0, evaluations=2 * length,
        jacobian_evaluations=0, structure=program.step_structure.label,
    )
    redo_if_not_finite(program, s0, xs_leaves, shared, states, stats, "the max-plus pass")
    return states, stats
