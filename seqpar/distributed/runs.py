"""A rank's share of a chain taken in runs of positions where its Jacobian blocks exceed the device's memory.

Unbounded, a rank evaluates the blocks of all its ``L_p`` positions at once
(``L_p N w^2`` values; ``L_p N w`` diagonal), where the same chain on one
device would be bounded (:mod:`seqpar.runtime.budget`). Where the share's
blocks exceed that bound (:func:`share_run`), the rank takes ``R`` positions
at a time, ``R`` those whose blocks fit, and drops a run's blocks before it
evaluates the next run's: it holds one run's blocks, whatever ``L_p``.

Forward, one Newton iteration over the active positions ``l = a .. L_p``:
the recursion ``y_l = A_l y_{l-1} + c_l`` (``c = F - s``) from
``y_{a-1} = 0`` gives ``e`` and the share's map ``Phi = A_{L_p} ... A_a``;
run by run, each from the last ``e`` of the run before, ``Phi`` composed as
``Phi_run Phi`` (:func:`linearised_in_runs`). Once the entry update ``d`` is
known (after the exchange), the same recursion from ``y_{a-1} = d`` is the
update (:func:`update_in_runs`), its blocks evaluated again run by run at the
same states (they were not kept): the system of the unbounded iteration,
solved in pieces, for a second Jacobian evaluation where ``d`` is not zero.

Adjoint: ``lam_{l-1} = g_{l-1} + J_l^T lam_l`` over the share from ``lam = 0``
after its last position gives the rank's boundary value ``J_1^T lam_1`` and
``Phi`` (:func:`adjoint_boundary_in_runs`: runs from the last, ``Phi``
composed as ``Phi Phi_run``, no VJP); the gradients are then
:func:`~seqpar.runtime.adjoint.adjoint_in_runs` from the right neighbour's
``lam``.
"""

from __future__ import annotations

import torch

from ..runtime.adjoint import states_before
from ..runtime.budget import memory_window
from ..runtime.pcr import solve_affine_recurrence
from ..runtime.program import windowed_steps
from .boundary import apply_map, block_product, fold_entry


def share_run(program, kind: str) -> int | None:
    """Positions per run of this rank's share, whose blocks of ``kind`` exceed the device's memory bound
    (:func:`~seqpar.runtime.budget.memory_window`); ``None`` where the whole share's blocks fit."""
    if kind == "identity":
        return None
    return memory_window(program.layout, program.length, kind, None)


def forward_runs(program, first: int, run: int):
    """``(start, stop, offset, rows)`` of the runs covering the positions ``[first, L)`` in order: a run's
    evaluated positions ``rows`` (``run`` of them, the traced window) end at or after ``stop``; its own
    positions ``[start, stop)`` are the evaluated ones from ``offset`` on."""
    length = program.length
    for start in range(first, length, run):
        stop = min(start + run, length)
        base = min(start, length - run)
        yield start, stop, start - base, slice(base, base + run)


def blocks_of_run(program, s_in, states, xs_leaves, shared, rows: slice, *, jacobian: str | None = None):
    """``(F, A)`` of the evaluated positions ``rows`` at the states before them (``s_in`` before position 0),
    by the step's trace for ``rows``' length (:func:`~seqpar.runtime.program.windowed_steps`)."""
    count = rows.stop - rows.start
    evaluate = windowed_steps(program, count, xs_leaves, shared, jacobian=jacobian)
    return evaluate(states_before(s_in, states, rows.start, count), [leaf[rows] for leaf in xs_leaves], shared)


def composed(before, after, kind: str):
    """``after before``: the map of a stretch of positions followed by the next stretch's (``None``: no
    positions)."""
    if before is None or after is None:
        return after if before is None else before
    return block_product(torch.stack([before, after]), kind)


def linearised_in_runs(program, kind, work, s_in, states, xs_leaves, shared, first: int, run: int, *, with_map):
    """``(F_a, c, e, Phi)`` of the active positions ``[first, L)``: the step at the first of them (its exact
    state when the start is on this rank), ``c = F - s`` and ``e`` (from ``y_{a-1} = 0``) ``(L - first, N, w)``
    in ``work``, and ``Phi`` (``None`` unless ``with_map``), taken ``run`` positions at a time."""
    c = torch.empty(program.length - first, *states.shape[1:], dtype=work, device=states.device)
    e = torch.empty_like(c)
    Phi = first_value = None
    for start, stop, offset, rows in forward_runs(program, first, run):
        values, A = blocks_of_run(program, s_in, states, xs_leaves, shared, rows)
        values, A = values[offset:], A[offset:].to(work)
        if first_value is None:
            first_value = values[0].clone()
        own = slice(start - first, stop - first)
        c[own] = values.to(work) - states[start:stop].to(work)
        c_run = c[own] if start == first else fold_entry(c[own], A, kind, e[start - first - 1])
        e[own] = solve_affine_recurrence(A, c_run, kind)
        if with_map:
            Phi = composed(Phi, block_product(A, kind), kind)
    return first_value, c, e, Phi


def update_in_runs(program, kind, work, s_in, states, xs_leaves, shared, first: int, run: int, c, d_in):
    """The update ``y_l = A_l y_{l-1} + c_l`` of the positions ``[first, L)`` from ``y_{first-1} = d_in``, the
    blocks evaluated again run by run at the states of the linearisation (``states`` not yet updated)."""
    update = torch.empty_like(c)
    carried = d_in
    for start, stop, offset, rows in forward_runs(program, first, run):
        _, A = blocks_of_run(program, s_in, states, xs_leaves, shared, rows)
        A = A[offset:].to(work)
        own = slice(start - first, stop - first)
        update[own] = solve_affine_recurrence(A, fold_entry(c[own], A, kind, carried), kind)
        carried = update[stop - first - 1]
    return update


def adjoint_boundary_in_runs(program, kind, work, s_in, states, xs_leaves, shared, grad_states, run: int):
    """``(J_1^T lam_1, Phi)`` of the adjoint over this rank's share from ``lam = 0`` after its last position:
    its boundary value for the rank before it and ``Phi = J_L ... J_1``, in ``work``, runs of ``run``
    positions from the last (the first run, where shorter, evaluated with the positions after it)."""
    length = program.length
    carried = Phi = None
    for stop in range(length, 0, -run):
        base = max(stop - run, 0)
        _, J = blocks_of_run(program, s_in, states, xs_leaves, shared, slice(base, base + run), jacobian="full")
        J = J[: stop - base].to(work)
        g = grad_states[base:stop].to(work)
        lam = solve_affine_recurrence(J, g if carried is None else fold_entry(g, None, kind, carried, reverse=True),
                                      kind, reverse=True)
        carried = apply_map(J[0], lam[0], kind, transpose=True)
        Phi = composed(block_product(J, kind), Phi, kind)
    return carried, Phi
