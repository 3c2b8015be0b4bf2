"""Newton, quasi-Newton and Picard solves of a chain, with a sequential fallback.

The chain ``s_l = f(s_{l-1}, x_l)``, ``l = 1..L``, is the root of the residual
system ``r_l(s) = s_l - f(s_{l-1}, x_l) = 0``. One iteration linearises it:

    ds_l = A_l ds_{l-1} - r_l,        ds_0 = 0,

with ``A_l = J_l = df/ds(s_{l-1})`` (``"full"``: Newton, DeepPCR / DEER),
``A_l = diag(J_l)`` (``"diag"``: quasi-Newton, quasi-DEER) or ``A_l = I``
(``"identity"``: Picard, ParaDiGMS), and solves it with the PCR driver.
Equivalently ``s_l <- f(s_{l-1}) + A_l (s^new_{l-1} - s_{l-1})``.

Whatever ``A`` is, after ``k`` iterations the first ``k`` states are exact
(Gonzalez et al. 2024, Prop. 1), so only the suffix that starts at the first
position whose update is above tolerance stays active. Convergence is declared
when every update satisfies ``|ds| <= atol + rtol |s|`` elementwise. On
non-finite values or at the iteration cap the remaining suffix is evaluated
sequentially: the result always equals the sequential loop.

Sliding window (ParaDiGMS, Shih et al. 2023). With ``window = W`` only the
positions ``[start, start + W)`` are active: one iteration evaluates ``f`` at
``W`` positions in one batched call (a step graph traced at length ``W``; the
last windows evaluate ``[L - W, L)`` and update only their active part),
updates the window, and ``start`` slides to the first position still above
tolerance. For ``A = I`` the update is a cumulative sum of the drifts
``e_k = F_k - s_k``: ``s_l <- s_l + sum_{k=start..l} e_k``. Positions that
enter the window start from the latest state of the previous window.

Exactness. The first active state's update is ``F_start - s_start`` with an
exact ``s_{start-1}``: it is set to ``F_start`` itself (not ``s + (F - s)``,
which rounds), so every iteration finishes one state bit for bit, and with
``W = 1`` the iteration evaluates ``f`` at exactly the states the sequential
loop sees: the result equals the loop (as far as the batched evaluation of one
step equals the step; it does for the traced graphs tested).

Affine chains. Where the step is proven affine in the state (``f(s) =
A_l s + c_l``, :mod:`seqpar.runtime.structure`) and the blocks are its exact
Jacobian (``"full"``, or ``"diag"`` for a diagonal step), one such update from
any guess is the solution: :func:`linear_solve` does it once, without a
convergence test (an exact solve needs no damping and takes none).

Damping (Levenberg-Marquardt, ELK: Gonzalez et al. 2024). With ``damping > 0``
the step on the active positions is ``(J^T J + lambda I) ds = J^T c``, ``J``
the bidiagonal matrix of the system above (``I`` on the diagonal, ``-A_l``
below), ``c = F - s``: the minimiser of ``||J ds - c||^2 + lambda ||ds||^2``, a
step inside a trust region, block tridiagonal and solved by
:mod:`seqpar.runtime.tridiagonal`. The first active state is fixed at ``F``
(exact, as above) and the rest solve the LM problem given it. Convergence is
still measured on the Newton step ``J n = c`` (also solved): the leading
positions whose Newton step is within tolerance take it, the rest the LM step.
``lambda`` starts at ``damping`` and is adapted per iteration (:class:`_TrustRegion`).

Tolerance. Each state vector (one batch element at one position) is tested
normwise, ``max_k |ds_k| <= atol + rtol max_k |s_k|`` with the new ``s``: the
test is relative to the state's own magnitude, so a chain whose states are
1e-6 is solved to the same relative accuracy as one whose states are 1, and
it matches how a step rounds (a matrix product's rounding error in every
element is relative to the norm of the vector, not to the element). ``atol``
defaults to the dtype's smallest normal number: only a state that is exactly
zero leans on it. Not ParaDiGMS' ``||ds||^2 / (D sigma^2) <= tol^2``: the max
is the stricter test and needs no noise level the runtime does not know;
ParaDiGMS' tolerance of 0.1 (relative rms) corresponds to a much larger
``tol`` here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .budget import positions_per_run
from .kernels import cpu_scan
from .estimates import CachedEstimates
from .maxplus import maxplus_solve
from .pcr import solve_affine_recurrence
from .program import windowed_steps
from .sequential import continue_sequentially, redo_if_not_finite
from .spec import (
    DEFAULT_TOLERANCE,
    LINEAR_CONVERGENCE_FACTOR,
    accumulation_dtype,
    decision_every,
)
from .stats import SolveStats
from .tridiagonal import levenberg_marquardt_step

log = logging.getLogger("seqpar.runtime")


@dataclass(frozen=True)
class Tolerance:
    """Stop when ``max_k |ds_k| <= atol + rtol * max_k |s_k|`` for every state vector (batch element, position)."""

    atol: float
    rtol: float

    @classmethod
    def resolve(cls, tol, dtype: torch.dtype, jacobian: str = "full") -> "Tolerance":
        """``None`` -> the default ``rtol`` for the dtype and the Jacobian kind; a float -> ``rtol = tol``;
        a pair -> ``(atol, rtol)``.

        Without a pair ``atol`` is the dtype's smallest normal number (a state that is exactly zero
        converges; any other is measured relative to its own magnitude). The default is
        :data:`DEFAULT_TOLERANCE`, times :data:`LINEAR_CONVERGENCE_FACTOR` for linearly converging
        iterations in float32 and float64.
        """
        floor = torch.finfo(dtype).tiny if dtype.is_floating_point else 0.0
        if tol is None:
            default = DEFAULT_TOLERANCE.get(dtype, 1e-5)
            if jacobian != "full" and dtype in (torch.float32, torch.float64):
                default *= LINEAR_CONVERGENCE_FACTOR
            return cls(floor, default)
        if isinstance(tol, (int, float)) and not isinstance(tol, bool):
            return cls(floor, float(tol))
        atol, rtol = tol
        return cls(float(atol), float(rtol))


def newton_solve(
    program, s0, xs_leaves, shared, *, tol: Tolerance, max_iters: int, damping: float = 0.0, window: int | None = None
):
    """Solve the chain of ``program`` from the packed ``s0`` of shape ``(N, w)``.

    Returns the packed states ``(L, N, w)`` (``s_1 .. s_L``) and a :class:`SolveStats`.
    ``damping = lambda_0 >= 0``: ``0`` is the plain (quasi-)Newton step above;
    ``> 0`` replaces it by the Levenberg-Marquardt / ELK step
    ``(J^T J + lambda I) ds = J^T c`` (:func:`_damped_update`, solved by
    :mod:`seqpar.runtime.tridiagonal`), with ``lambda`` adapted per iteration
    from ``lambda_0`` (:class:`_TrustRegion`). The first active state still
    becomes exact, so each iteration keeps finishing at least one state.
    ``window`` (``None`` or ``W >= 1``): at most ``W`` active positions per
    iteration, evaluated in one batched call of a step graph traced at length
    ``W`` (:func:`windowed_steps`); ``None`` or ``W >= L``: the whole chain.

    Host decisions: every ``k`` iterations (:func:`~seqpar.runtime.spec.decision_every`:
    4 on CUDA, 1 elsewhere) the host reads the iteration's outcome (the
    converged prefix, the largest update, finiteness) and decides the window
    advance, convergence and fallback; in between, iterations repeat on the
    same active positions without a synchronisation (``_update(...,
    decide=False)``). That stays exact: each iteration makes the first not yet
    exact position exact, so after ``m`` iterations since the last decision
    ``m`` more positions are exact and the start advances by at least ``m``; a
    non-finite value found at a decision falls back to the sequential loop from
    the last decided start, whose prefix no iteration writes to. The damped
    update adapts ``lambda`` from each iteration's merit and decides every
    iteration.

    An affine chain with exact blocks (:attr:`ChainProgram.one_linear_solve`)
    is solved by :func:`linear_solve` instead (``window`` bounds its runs of positions; no damping), a max-plus
    chain (:attr:`ChainProgram.one_maxplus_solve`) by :func:`~seqpar.runtime.maxplus.maxplus_solve`.
    """
    kind = program.solve_kind  # the linear solve's blocks ("diag" for jacobian="estimate")
    length = program.length
    if window is not None and window >= length:
        window = None
    if program.one_linear_solve:
        return linear_solve(program, s0, xs_leaves, shared, window)
    if program.one_maxplus_solve:
        return maxplus_solve(program, s0, xs_leaves, shared)
    work = accumulation_dtype(s0.dtype)
    stats = SolveStats(length=length, jacobian=program.jacobian, window=window, structure=program.step_structure.label)
    # One buffer for s_0 .. s_L: the states are rows 1.., the previous states
    # (the steps' inputs) rows 0..L-1, both views, updated in place.
    buffer = s0.unsqueeze(0).expand(length + 1, *s0.shape).clone()
    states, prev = buffer[1:], buffer[:-1]
    estimates = None
    if program.jacobian == "estimate":  # A_l made once per position, at its first evaluation
        estimates = CachedEstimates(program, states)
    evaluate = windowed_steps(program, window, xs_leaves, shared) if window is not None and not estimates else None
    start = 0
    region = _TrustRegion(damping) if damping else None
    every = 1 if region is not None else decision_every(s0.device)
    pending = 0  # iterations since the last decision
    guessed = 0  # windowed: positions [0, guessed) have been given a guess
    while start < length:
        if stats.iterations == max_iters:
            stats.fallback = (
                f"did not converge in {max_iters} iterations "
                f"(largest update {stats.residual:.3g} x tolerance at position {start + 1} of {length})"
            )
            break
        stats.iterations += 1
        if window is None:
            stop, first = length, 0
        else:
            stop = min(start + window, length)
            first = min(start, length - window)  # the evaluated positions [first, first + window)
            if stop > guessed:  # positions entering the window start from the latest state
                if guessed:
                    states[guessed:stop] = states[guessed - 1]
                guessed = stop
        evaluated = length if window is None else window  # positions evaluated this iteration
        if estimates is not None:
            values = estimates(prev, xs_leaves, shared, first, evaluated)
            stats.jacobian_evaluations = estimates.estimated
        elif window is None:
            values = evaluate_all(program, kind, prev, xs_leaves, shared)
        else:
            values = evaluate(prev[first : first + window], [leaf[first : first + window] for leaf in xs_leaves], shared)
        if estimates is None and kind != "identity":
            stats.jacobian_evaluations += evaluated
        stats.evaluations += evaluated
        values, A = (values, None) if kind == "identity" else values
        offset = start - first
        values = values[offset : offset + stop - start]
        A = None if A is None else A[offset : offset + stop - start]
        pending += 1
        decide = pending == every or stats.iterations == max_iters
        if region is not None:
            above, stats.residual, finite = _damped_update(states, start, stop, values, A, kind, region, tol, work)
        elif not decide:
            _update(states, start, stop, values, A, kind, tol, work, decide=False)
            continue
        else:
            above, stats.residual, finite = _update(states, start, stop, values, A, kind, tol, work)
        if not finite:
            stats.fallback = f"non-finite values at iteration {stats.iterations}"
            break
        # The first `pending` active states are exact now; above = stop - start when converged.
        start += max(pending, above)
        pending = 0
    stats.converged = stats.fallback is None
    if not stats.converged:
        log.info("chain of %d steps: %s; finishing sequentially from step %d", length, stats.fallback, start + 1)
        continue_sequentially(program, s0, xs_leaves, shared, states, start)
        stats.sequential_steps = length - start
        stats.evaluations += length - start
    return states, stats


def linear_solve(program, s0, xs_leaves, shared, window: int | None = None):
    """An affine chain ``s_l = A_l s_{l-1} + c_l`` (``A_l``, ``c_l`` independent of the state) in one linear solve.

    One batched evaluation at the previous states ``(s_0, 0, .., 0)`` gives
    ``F_1 = f(s_0, x_1) = s_1`` (the loop's own first step) and
    ``F_l = f(0, x_l) = c_l`` for ``l >= 2``, ``(L, N, w)``, with the blocks
    ``A_l``: the exact Jacobian, the same at every state (``(L, N, w, w)``, or
    ``(L, N, w)`` for a diagonal step). The states are the solution of

        y_l = A_l y_{l-1} + F_l,    y_1 = F_1,

    by :func:`~seqpar.runtime.pcr.solve_affine_recurrence` (PCR; on CPU the
    compiled substitution): no Newton iteration and no convergence test, the
    solve being exact up to rounding. The positions are taken in runs of
    :func:`linear_run` (``window`` when given; on CPU runs whose blocks fit in
    cache, each started from the last state of the one before, exact): the
    same evaluations and the same solve, without the page faults of
    chain-sized temporaries. Non-finite values (an expanding chain that
    overflows) hand the whole chain to the sequential loop, and the stats say
    why. Returns ``(states (L, N, w), stats)`` like :func:`newton_solve`.
    """
    length = program.length
    run = linear_run(program, window)
    evaluate = program.steps_and_jacobians if run == length else windowed_steps(program, run, xs_leaves, shared)
    states = s0.new_empty(length, *s0.shape)
    prev = s0.new_zeros(run, *s0.shape)
    last = s0
    for start in range(0, length, run):
        first = min(start, length - run)  # the evaluated positions [first, first + run)
        offset = start - first
        prev[offset] = last
        values, A = evaluate(prev, [leaf[first : first + run] for leaf in xs_leaves], shared)
        prev[offset] = 0
        states[start : first + run] = solve_affine_recurrence(A[offset:], values[offset:], program.solve_kind)
        last = states[first + run - 1]
    stats = SolveStats(
        length=length, jacobian=program.jacobian, iterations=1, converged=True, residual=0.0, evaluations=length,
        jacobian_evaluations=length, window=window, structure=program.step_structure.label,
    )
    redo_if_not_finite(program, s0, xs_leaves, shared, states, stats, "the one linear solve of an affine chain")
    return states, stats


def linear_run(program, window: int | None) -> int:
    """Positions per batched evaluation of :func:`linear_solve`: :func:`~seqpar.runtime.budget.positions_per_run`
    for the forward's blocks (cache-sized on CPU; all ``L`` on a GPU where they fit its memory), at most
    ``window`` when one is given."""
    run = positions_per_run(program.layout, program.length, program.solve_kind)
    return run if window is None else min(window, run)


def evaluated_positions(program, window: int | None) -> int:
    """Positions one batched evaluation of the forward solve covers: :func:`linear_run` for a chain solved by
    one linear solve, else ``window`` (``L`` when ``None``); the program needs a windowed trace below ``L``."""
    if program.one_linear_solve:
        return linear_run(program, window)
    return program.length if window is None else min(window, program.length)


class _TrustRegion:
    """The Levenberg-Marquardt parameter ``lambda``, adapted once per iteration.

    The merit is ``Phi = sum_l ||F_l - s_l||^2`` over the positions active both
    at this iteration and the last one (the same positions before and after the
    last step). If ``Phi`` fell, ``lambda <- max(lambda / 4, 1e-6 lambda_0)``
    (trust the linear model more, towards Newton), otherwise
    ``lambda <- min(2 lambda, 1e3 lambda_0)``; ``lambda_0`` is the ``damping``
    given. No step is rejected (that would cost an evaluation): the prefix
    exactness and the Newton-step convergence test keep the result right.
    """

    SHRINK, GROW, LOWEST, HIGHEST = 0.25, 2.0, 1e-6, 1e3

    def __init__(self, damping: float):
        self.initial = self.value = damping
        self.previous = None  # (per-position merit (M,), start, stop) of the last iteration

    def update(self, c: torch.Tensor, start: int, stop: int) -> float:
        """``lambda`` for this iteration's step from ``c = F - s`` at the active ``[start, stop)``."""
        merit = c.square().flatten(1).sum(1)
        if self.previous is not None:
            before, before_start, before_stop = self.previous
            if before_stop > start:  # positions [start, before_stop) were active both times
                if float(merit[: before_stop - start].sum()) < float(before[start - before_start :].sum()):
                    self.value = max(self.value * self.SHRINK, self.LOWEST * self.initial)
                else:
                    self.value = min(self.value * self.GROW, self.HIGHEST * self.initial)
        self.previous = (merit, start, stop)
        return self.value


def _update(states, start, stop, values, A, kind, tol, work, decide: bool = True):
    """One (quasi-)Newton iteration on the active positions ``[start, stop)``, in place.

    ``s <- s + y`` with ``y_l - A_l y_{l-1} = F_l - s_l``, and ``s_start <- F_start``
    (exact: ``f`` of an exact previous state, not ``s + (F - s)``). Returns
    ``(above, largest, finite)``: the first active position (from 0) whose
    update is above tolerance (:func:`tolerance_ratios` above 1 for some batch
    element; ``stop - start`` when none; ``0 / 0`` counts as converged), the
    largest ratio, and whether the update is finite. On CPU (float32/float64) one call
    of the compiled kernel does it all (:func:`seqpar.runtime.kernels.cpu_scan.newton_update`).
    ``decide=False``: the update only, nothing read back to the host (returns ``None``).
    """
    active = states[start:stop]
    if kind != "identity" and work == states.dtype and cpu_scan.supports(A, values) and cpu_scan.available(work):
        return cpu_scan.newton_update(A, values, active, kind, tol.atol, tol.rtol)
    if work == states.dtype:
        update = solve_affine_recurrence(A, values - active, kind)
        active += update  # the new states
        new_active = active
    else:
        active = active.to(work)
        update = solve_affine_recurrence(A, values.to(work) - active, kind)
        new_active = active + update
        states[start:stop] = new_active.to(states.dtype)
    states[start] = values[0]
    if not decide:
        return None
    per_step = tolerance_ratios(update, new_active, tol).flatten(1).amax(dim=1)
    largest = float(per_step.max())
    # A non-finite update makes the largest ratio non-finite (the check costs nothing otherwise).
    finite = math.isfinite(largest) or bool(torch.isfinite(update).all())
    return first_above(per_step), largest, finite


def tolerance_ratios(update: torch.Tensor, new_states: torch.Tensor, tol: Tolerance) -> torch.Tensor:
    """``max_k |y_k| / (atol + rtol max_k |s_k|)`` per state vector: ``(..., w) -> (...)``; ``0 / 0`` is NaN."""
    scale = new_states.abs().amax(dim=-1).mul_(tol.rtol).add_(tol.atol)
    return update.abs().amax(dim=-1).div_(scale)


def first_above(per_step: torch.Tensor) -> int:
    """The first position whose ratio is above 1, ``len(per_step)`` when none (NaN, ``0 / 0``, is not above)."""
    above = torch.nonzero(per_step > 1.0)
    return int(above[0]) if above.numel() else per_step.shape[0]


def _damped_update(states, start, stop, values, A, kind, region, tol, work):
    """One Levenberg-Marquardt (ELK) iteration on the active positions ``[start, stop)``, in place.

    With ``c = F - s`` (``(M, N, w)``, in ``work``) and ``lambda`` from ``region``:

    * the Newton step ``n``: ``n_l - A_l n_{l-1} = c_l`` (:func:`solve_affine_recurrence`);
    * the LM step ``ds``: ``ds_0 = c_0`` (``s_start`` becomes ``F_start``, exact
      since ``s_{start-1}`` is), and for positions ``1 .. M-1`` the minimiser of
      ``||J' ds' - c'||^2 + lambda ||ds'||^2`` with ``J'`` the bidiagonal ``(I, -A_l)``
      on those positions and ``c'_1 = c_1 + A_1 c_0`` (the residual linearised at
      the new ``s_start``), ``c'_l = c_l`` otherwise: :func:`levenberg_marquardt_step`.
      With ``lambda = 0``, ``ds = n``.

    The Newton step measures convergence as without damping: the leading ``p``
    positions whose :func:`tolerance_ratios` of ``n`` at ``s + n`` are at most 1 (a non-finite ``n`` is above)
    take ``s + n``, the rest ``s + ds``; then ``s_start = F_start`` exactly. A
    non-finite ``ds`` below the initial ``lambda`` is solved again at the initial
    ``lambda``. Returns ``(above, largest, finite)`` as :func:`_update` does,
    for those ratios (``inf`` where ``n`` is not finite); ``finite``: whether ``F`` and ``ds`` are.
    """
    active = states[start:stop].to(work)
    c = values.to(work) - active
    lam = region.update(c, start, stop)
    newton = solve_affine_recurrence(A, c, kind)
    step = _lm_step_from_exact_first(A, c, kind, lam)
    if lam < region.initial and not bool(torch.isfinite(step).all()):
        region.value = region.initial
        step = _lm_step_from_exact_first(A, c, kind, region.initial)
    if not bool(torch.isfinite(step).all()):
        return 0, math.inf, False
    scaled = tolerance_ratios(newton, active + newton, tol)
    scaled.masked_fill_(newton.abs().amax(dim=-1) == 0, 0.0).nan_to_num_(nan=math.inf)  # 0 / 0 converged, NaN not
    per_step = scaled.flatten(1).amax(dim=1)
    converged = first_above(per_step)
    step[:converged] = newton[:converged]
    states[start:stop] = (active + step).to(states.dtype)
    states[start] = values[0]  # exact: f of an exact previous state
    return converged, float(per_step.max()), True


def _lm_step_from_exact_first(A, c, kind, damping):
    """``ds`` with ``ds_0 = c_0`` and the LM step for positions ``1..`` (see :func:`_damped_update`)."""
    step = c.clone()
    if c.shape[0] > 1:
        rest = c[1:].clone()
        if kind == "identity":
            rest[0] += c[0]
        elif kind == "diag":
            rest[0] += A[1].to(c.dtype) * c[0]
        else:
            rest[0] += (A[1].to(c.dtype) @ c[0].unsqueeze(-1)).squeeze(-1)
        step[1:] = levenberg_marquardt_step(None if A is None else A[1:], rest, kind, damping)
    return step


def evaluate_all(program, kind, prev, xs_leaves, shared):
    """``F`` (identity) or ``(F, A)`` at all ``L`` positions."""
    if kind == "identity":
        return program.steps_at(prev, xs_leaves, shared)
    return program.steps_and_jacobians(prev, xs_leaves, shared)
