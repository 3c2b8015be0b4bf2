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
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .pcr import accumulation_dtype, solve_affine_recurrence

log = logging.getLogger("seqpar.runtime")

DEFAULT_TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}
DEFAULT_MAX_ITERS = 40


@dataclass(frozen=True)
class Tolerance:
    """Stop when ``|ds| <= atol + rtol * |s|`` for every state value."""

    atol: float
    rtol: float

    @classmethod
    def resolve(cls, tol, dtype: torch.dtype) -> "Tolerance":
        """``None`` -> the dtype default; a float -> ``atol = rtol = tol``; a pair -> ``(atol, rtol)``."""
        if tol is None:
            value = DEFAULT_TOLERANCE.get(dtype, 1e-5)
            return cls(value, value)
        if isinstance(tol, (int, float)) and not isinstance(tol, bool):
            return cls(float(tol), float(tol))
        atol, rtol = tol
        return cls(float(atol), float(rtol))


@dataclass
class SolveStats:
    """What one chain solve did.

    ``iterations``: parallel iterations run; ``residual``: largest update at the
    last iteration in units of the tolerance (<= 1 means converged);
    ``fallback``: why the sequential loop finished the chain, ``None`` if it did
    not; ``sequential_steps``: how many steps that loop evaluated.
    """

    length: int
    jacobian: str
    iterations: int = 0
    converged: bool = False
    residual: float = float("inf")
    fallback: str | None = None
    sequential_steps: int = 0
    direction: str = "forward"


def newton_solve(program, s0, xs_leaves, shared, *, tol: Tolerance, max_iters: int, damping: float = 0.0):
    """Solve the chain of ``program`` from the packed ``s0`` of shape ``(N, w)``.

    Returns the packed states ``(L, N, w)`` (``s_1 .. s_L``) and a :class:`SolveStats`.
    ``damping`` (>= 0) shortens every update but the first active one by
    ``1 / (1 + damping)`` (a damped Newton step); the first active state still
    becomes exact, so each iteration keeps finishing at least one state.
    """
    kind = program.jacobian
    length = program.length
    work = accumulation_dtype(s0.dtype)
    in_place = work == s0.dtype
    stats = SolveStats(length=length, jacobian=kind)
    # One buffer for s_0 .. s_L: the states are rows 1.., the previous states
    # (the steps' inputs) rows 0..L-1, both views, updated in place.
    buffer = s0.unsqueeze(0).expand(length + 1, *s0.shape).clone()
    states, prev = buffer[1:], buffer[:-1]
    start = 0
    while start < length:
        if stats.iterations == max_iters:
            stats.fallback = (
                f"did not converge in {max_iters} iterations "
                f"(largest update {stats.residual:.3g} x tolerance at position {start + 1} of {length})"
            )
            break
        stats.iterations += 1
        if kind == "identity":
            values, A = program.steps_at(prev, xs_leaves, shared), None
        else:
            values, A = program.steps_and_jacobians(prev, xs_leaves, shared)
            A = A[start:]
        window = states[start:]
        if in_place:
            update = solve_affine_recurrence(A, values[start:] - window, kind)
        else:
            window = window.to(work)
            update = solve_affine_recurrence(A, values[start:].to(work) - window, kind)
        if damping:
            update[1:] /= 1.0 + damping
        if in_place:
            window += update  # the new states
            new_window = window
        else:
            new_window = window + update
            states[start:] = new_window.to(states.dtype)
        scaled = update.abs().div_(new_window.abs().mul_(tol.rtol).add_(tol.atol))
        per_step = scaled.flatten(1).amax(dim=1)
        stats.residual = float(per_step.max())
        # A non-finite update makes the residual non-finite (the check costs nothing otherwise).
        if not math.isfinite(stats.residual) and not bool(torch.isfinite(update).all()):
            stats.fallback = f"non-finite values at iteration {stats.iterations}"
            break
        if stats.residual <= 1.0:
            start = length
            continue
        above = torch.nonzero(per_step > 1.0)
        if above.numel() == 0:  # NaN ratios (0 / 0 with atol = 0) count as converged
            start = length
        else:
            start += max(1, int(above[0]))  # the first active state is exact now
    stats.converged = stats.fallback is None
    if not stats.converged:
        log.info("chain of %d steps: %s; finishing sequentially from step %d", length, stats.fallback, start + 1)
        _finish_sequentially(program, s0, xs_leaves, shared, states, start)
        stats.sequential_steps = length - start
    return states, stats


def _finish_sequentially(program, s0, xs_leaves, shared, states, start):
    """``s_l = f(s_{l-1}, x_l)`` for ``l >= start``, in place, exactly as the sequential loop."""
    current = s0 if start == 0 else states[start - 1]
    for index in range(start, program.length):
        current = program.step_sequential(index, current, xs_leaves, shared)
        states[index] = current
