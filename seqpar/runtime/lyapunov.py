"""The predictability probe: the largest Lyapunov exponent of a chain.

    lambda = (1/L) sum_l log( ||J_l v_{l-1}|| ),   v_l = J_l v_{l-1} / ||J_l v_{l-1}||,

along the sequential trajectory ``s_l = f(s_{l-1}, x_l)`` from a random unit
``v_0`` (power iteration through the Jacobian products, one JVP per step).
``lambda < 0``: the chain contracts perturbations and Newton-type iterations
converge in a number of steps independent of ``L``; ``lambda > 0``: errors
grow like ``exp(lambda L)`` and the chain should stay sequential (Gonzalez,
Kozachkov et al. 2025).
"""

from __future__ import annotations

import math

import torch
from torch.func import jvp


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
    state, total = s0, 0.0
    with torch.no_grad():
        for index in range(length):
            x_leaves = [leaf[index] for leaf in xs_leaves]
            state, tangent = jvp(lambda s: step(s, x_leaves, shared), (state,), (tangent,))
            growth = float(tangent.to(work).norm())
            if not math.isfinite(growth) or not bool(torch.isfinite(state).all()):
                return math.inf
            if growth == 0.0:
                return -math.inf
            total += math.log(growth)
            tangent = tangent / growth
    return total / length
