"""The predictability probe: the largest Lyapunov exponent of a chain.

    lambda = (1/L) sum_l log( ||J_l v_{l-1}|| ),   v_l = J_l v_{l-1} / ||J_l v_{l-1}||,

along the sequential trajectory ``s_l = f(s_{l-1}, x_l)`` from a random unit
``v_0`` (power iteration through the Jacobian products, one JVP per step).
``lambda < 0``: the chain contracts perturbations and Newton-type iterations
converge in a number of steps independent of ``L``; ``lambda > 0``: errors
grow like ``exp(lambda L)`` and the chain should stay sequential (Gonzalez,
Kozachkov et al. 2025).

Each ``log ||J_l v||`` carries the rounding of the norm it is taken of, a
relative error of order ``eps``, so the mean resolves ``lambda`` to about
``eps``: an estimate with ``|lambda| <= eps`` of the work dtype (float64 for
float64 states, float32 otherwise: a half-precision chain is not granted
its own coarser rounding) is reported as ``0`` (neutral). A chain whose Jacobians have unit spectral radius (xLSTM's memory
where the forget gate saturates: ``exp(f + m - max(f + m, i)) = 1``) gives
``|lambda| ~ 1e-9`` in float32 from rounding alone, and was taken as
unpredictable by its sign.

Where a step has no forward-mode derivative (e.g. the fused CPU attention
kernel of a UNet), the same exponent comes from reverse mode: the product
``J_L ... J_1`` and its transpose have the same singular values, so power
iteration with VJPs ``u_{l-1} = J_l^T u_l / ||J_l^T u_l||`` backwards along the
stored trajectory averages the same logarithms.

The probe's failures are expected (a step with no forward-mode formula, a graph
the caller cannot run): :func:`log_probe_failure` reports each as one line
at INFO on the ``seqpar.runtime`` logger and the full error, with its
traceback, only at DEBUG.
"""

from __future__ import annotations

import logging
import math

import torch
from torch.func import jvp, vjp

from .errors import brief

log = logging.getLogger("seqpar.runtime")


def largest_lyapunov_exponent(
    step, length: int, s0, xs_leaves, shared, *, seed: int = 0, max_steps: int | None = None
) -> float:
    """Estimate ``lambda`` for ``s_l = step(s_{l-1}, x_leaves_l, shared)``, ``l = 1..length``.

    ``xs_leaves`` are stacked on dim 0; the state ``s0`` may have any shape.
    ``max_steps`` bounds the cost (one JVP per step): the average is then taken
    over the first ``max_steps`` steps. Returns ``inf`` when the trajectory or
    the tangent stops being finite.
    """
    length = length if max_steps is None else min(length, max_steps)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    work = torch.float64 if s0.dtype == torch.float64 else torch.float32
    tangent = torch.randn(s0.shape, generator=generator, dtype=work).to(device=s0.device, dtype=s0.dtype)
    tangent = tangent / tangent.norm()
    try:
        estimate = _forward_mode(step, length, s0, xs_leaves, shared, tangent, work)
    except (RuntimeError, NotImplementedError) as error:  # no forward-mode formula for some op of the step
        log_probe_failure("no forward-mode derivative, estimated in reverse mode", error)
        estimate = _reverse_mode(step, length, s0, xs_leaves, shared, tangent, work)
    return 0.0 if abs(estimate) <= torch.finfo(work).eps else estimate


def log_probe_failure(what: str, error: BaseException) -> None:
    """``seqpar: predictability probe: <what> (<Error>: <first line>)`` at INFO; the whole error at DEBUG.

    Errors raised through FX carry the generated code and the original stack in
    their message: those lines, and the traceback, are details for DEBUG.
    """
    log.info("seqpar: predictability probe: %s (%s)", what, brief(error))
    log.debug("seqpar: predictability probe: %s", what, exc_info=error)


def _forward_mode(step, length, s0, xs_leaves, shared, tangent, work) -> float:
    """Power iteration with one JVP per step along the trajectory."""
    state, total = s0, 0.0
    with torch.no_grad():
        for index in range(length):
            x_leaves = [leaf[index] for leaf in xs_leaves]
            state, tangent = jvp(lambda s: step(s, x_leaves, shared), (state,), (tangent,))
            if not bool(torch.isfinite(state).all()):
                return math.inf
            tangent, log_growth = _normalised(tangent, work)
            if not math.isfinite(log_growth):
                return log_growth
            total += log_growth
    return total / length


def _reverse_mode(step, length, s0, xs_leaves, shared, cotangent, work) -> float:
    """Power iteration with one VJP per step, backwards along the stored trajectory."""
    states = [s0]
    with torch.no_grad():
        for index in range(length):
            states.append(step(states[-1], [leaf[index] for leaf in xs_leaves], shared))
            if not bool(torch.isfinite(states[-1]).all()):
                return math.inf
    total = 0.0
    for index in reversed(range(length)):
        x_leaves = [leaf[index] for leaf in xs_leaves]
        _, pullback = vjp(lambda s: step(s, x_leaves, shared), states[index])
        (cotangent,) = pullback(cotangent)
        cotangent, log_growth = _normalised(cotangent.detach(), work)
        if not math.isfinite(log_growth):
            return log_growth
        total += log_growth
    return total / length


def _normalised(vector, work):
    """``(vector / ||vector||, log ||vector||)``; the log is ``-inf`` for a zero vector and
    ``inf`` for a non-finite one (the vector is then of no further use)."""
    growth = float(vector.to(work).norm())
    if not math.isfinite(growth):
        return vector, math.inf
    if growth == 0.0:
        return vector, -math.inf
    return vector / growth, math.log(growth)
