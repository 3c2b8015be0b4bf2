"""Exact gradients of a solved chain by implicit differentiation.

At the solution ``s_l = f(s_{l-1}, x_l)`` the gradient of a loss with direct
gradients ``g_l = dLoss/ds_l`` follows the adjoint recursion

    lam_L = g_L,        lam_{l-1} = g_{l-1} + J_l^T lam_l,       J_l = df/ds(s_{l-1}, x_l),

a lower block-bidiagonal system in reverse order with transposed blocks. Then

    dLoss/ds_0 = J_1^T lam_1,   dLoss/dx_l = (df/dx_l)^T lam_l,   dLoss/dshared = sum_l (df/dshared)^T lam_l,

one batched vector-Jacobian product of all steps. ``"parallel"`` solves the
recursion with the PCR driver on the full Jacobians at the solution (exact even
when the forward solve used diagonal or identity blocks; for a step proven
diagonal they are its diagonal blocks ``(L, N, w)``, at any width); on CPU an
adjoint whose blocks would take more than a cache's worth of memory runs from
the last position to the first in runs (:func:`adjoint_in_runs`), the same
products in pieces: its memory is bounded by a run's blocks whatever ``L``
(dense blocks of the whole chain, ``L N w^2`` values and PCR's temporaries,
took 7.2 GiB for a GRU of width 64 at batch 4 and 16384 steps, where eager
took 0.5 and the runs 0.1; benchmarks/RESULTS.md, "The dense adjoint in runs").
``"sequential"`` runs it as ``L``
vector-Jacobian products, for states too wide for dense blocks, in one
generated loop (:mod:`.rolled_adjoint`).
Nothing is differentiated through Newton iterations.
"""

from __future__ import annotations

import torch

from .pcr import solve_affine_recurrence
from .program import windowed_steps, windowed_steps_vjp
from .rolled_adjoint import adjoint_loop_for
from .budget import positions_per_run


def adjoint_solve(program, s0, xs_leaves, shared, states, grad_states):
    """Gradients ``(d s0, [d x leaves], [d shared])`` of a chain given ``dLoss/dstates``.

    ``s0``: ``(N, w)``; ``states`` and ``grad_states``: ``(L, N, w)`` packed.
    """
    if program.adjoint != "parallel":
        return sequential_adjoint(program, (s0, *states[:-1].unbind(0)), xs_leaves, shared, grad_states)
    run = adjoint_run(program)
    if run is not None:
        return adjoint_in_runs(program, s0, states, xs_leaves, shared, grad_states, run)
    prev = torch.cat([s0.unsqueeze(0), states[:-1]], dim=0)
    _, jacobians = program.full_jacobians(prev, xs_leaves, shared)
    lam = solve_affine_recurrence(jacobians, grad_states, program.adjoint_kind, reverse=True)
    grad_prev, grad_xs, grad_shared = program.steps_vjp(prev, xs_leaves, shared, lam)
    return grad_prev[0], list(grad_xs), list(grad_shared)


def adjoint_run(program) -> int | None:
    """Positions per run of a parallel adjoint taken in runs (:func:`adjoint_in_runs`), or ``None`` (one
    pass over the whole chain): runs where the chain's blocks (diagonal or dense) exceed
    :func:`~seqpar.runtime.budget.positions_per_run` (on CPU cache-sized runs; on every device the memory bound)."""
    if program.adjoint != "parallel":
        return None
    run = positions_per_run(program.layout, program.length, program.adjoint_kind)
    return run if run < program.length else None


def prepare_adjoint(program, xs_leaves, shared) -> None:
    """Trace a run-wise adjoint's graphs now (at build time, not in the first backward pass)."""
    run = adjoint_run(program)
    if run is not None:
        windowed_steps(program, run, xs_leaves, shared, jacobian="full")
        windowed_steps_vjp(program, run, xs_leaves, shared)


def adjoint_in_runs(program, s0, states, xs_leaves, shared, grad_states, run: int):
    """The parallel adjoint taken ``run`` positions at a time, the last run first.

    For the positions ``[first, stop)`` of a run: their Jacobian blocks
    ``J_{first+1} .. J_stop``, the adjoint recursion over the run with
    ``c_{stop-1} = g_{stop-1} + J_{stop+1}^T lam_stop`` (the run after it
    handed that product on: ``grad_prev`` of its first position), and one
    batched VJP of the run's steps with ``lam``, giving their inputs' gradients
    and ``J_{first+1}^T lam_first`` for the run before. The recursion is the
    whole chain's, split where one run hands ``lam`` to the next: the same
    products, on blocks that stay in cache. Every run evaluates ``run``
    positions (one trace each for the Jacobians and the VJP): the first run
    of the chain, where shorter, is evaluated from position 0 with a zero
    cotangent on the positions after it, whose gradients the run after it
    already gave. The states a run's steps read are a view of ``states``
    (``s_0`` and the first run's joined in a copy of one run): no chain-sized
    copy of the states shifted by one.
    """
    length = program.length
    jacobians = windowed_steps(program, run, xs_leaves, shared, jacobian="full")
    steps_vjp = windowed_steps_vjp(program, run, xs_leaves, shared)
    grad_xs = [None] * len(xs_leaves)
    grad_shared = [torch.zeros_like(tensor) if tensor.is_floating_point() else None for tensor in shared]
    carried = torch.zeros_like(s0)  # J_{stop+1}^T lam_stop, zero after the last position
    lam = torch.zeros_like(states[:run])
    for stop in range(length, 0, -run):
        first = max(stop - run, 0)
        active = stop - first
        rows = slice(first, first + run)  # the positions evaluated: the run's own, then (first run) later ones
        x_rows = [leaf[rows] for leaf in xs_leaves]
        prev = states_before(s0, states, first, run)
        _, blocks = jacobians(prev, x_rows, shared)
        c = grad_states[first:stop].clone()
        c[-1] += carried
        lam[:active] = solve_affine_recurrence(blocks[:active], c, program.adjoint_kind, reverse=True)
        lam[active:] = 0
        grad_prev, grad_x, grad_sh = steps_vjp(prev, x_rows, shared, lam)
        _store_rows(grad_xs, xs_leaves, [None if part is None else part[:active] for part in grad_x],
                    slice(first, stop))
        for total, part in zip(grad_shared, grad_sh):
            if part is not None:
                total += part
        carried = grad_prev[0]
    return carried, grad_xs, grad_shared


def states_before(s0, states, first: int, count: int) -> torch.Tensor:
    """The states the positions ``first .. first + count - 1`` step from, ``(count, N, w)``: a view of
    ``states`` (``(L, N, w)``), or for ``first = 0`` a copy of ``count`` rows with ``s0`` first."""
    if first:
        return states[first - 1 : first - 1 + count]
    return torch.cat([s0.unsqueeze(0), states[: count - 1]])


def sequential_adjoint(program, prev, xs_leaves, shared, grad_states):
    """The same recursion as ``L`` vector-Jacobian products, last step first: the step's VJP graph written out
    as one loop (:mod:`.rolled_adjoint`), or called per step where it cannot be. ``prev``: the ``L`` states
    ``s_0 .. s_{L-1}`` the steps read, a sequence of ``(N, w)`` tensors (the solved states' rows: no copy)."""
    grad_shared = [torch.zeros_like(tensor) if tensor.is_floating_point() else None for tensor in shared]
    loop = adjoint_loop_for(program, len(xs_leaves), len(shared))
    if loop.run is None:
        return _adjoint_by_step_calls(program, prev, xs_leaves, shared, grad_states, grad_shared)
    grad_xs = [torch.empty_like(leaf) if index in loop.x_outputs else None for index, leaf in enumerate(xs_leaves)]
    grad_s0 = loop.run(
        prev, [leaf.unbind(0) for leaf in xs_leaves], list(shared), grad_states.unbind(0),
        [grad_xs[index].unbind(0) for index in loop.x_outputs], [grad_shared[index] for index in loop.shared_outputs],
    )
    return grad_s0, grad_xs, grad_shared


def _adjoint_by_step_calls(program, prev, xs_leaves, shared, grad_states, grad_shared):
    """:func:`sequential_adjoint` calling ``program.step_vjp`` once per step."""
    grad_xs = [None] * len(xs_leaves)
    lam = grad_states[-1]
    for index in reversed(range(program.length)):
        x_leaves = [leaf[index] for leaf in xs_leaves]
        grad_prev, grad_x, grad_sh = program.step_vjp(prev[index], x_leaves, list(shared), lam)
        _store_rows(grad_xs, xs_leaves, grad_x, index)
        for total, part in zip(grad_shared, grad_sh):
            if part is not None:
                total += part
        lam = grad_prev if index == 0 else grad_states[index - 1] + grad_prev
    return lam, grad_xs, grad_shared


def _store_rows(totals, leaves, parts, rows) -> None:
    """``totals[i][rows] = parts[i]`` for the per-step inputs' gradients, each buffer made (uninitialised) at its
    first part: the adjoint writes every row of a leaf exactly once (the zeros of a chain-sized buffer cost as much
    as writing it: 14 ms for xLSTM's 64 MB at 256 steps), and a leaf without a gradient (an integer or frozen
    input, ``None`` at every step) stays ``None``."""
    for index, part in enumerate(parts):
        if part is None:
            continue
        if totals[index] is None:
            totals[index] = torch.empty_like(leaves[index])
        totals[index][rows] = part
