"""Estimated Jacobians ``A_l = c_l I``, made once per position of a solve (``jacobian="estimate"``).

:func:`~seqpar.runtime.program.rayleigh_estimate` gives ``c_l`` from one VJP
at position ``l``'s input state ``s_{l-1}``. In the quasi-Newton iteration

    ds_l = A_l ds_{l-1} - r_l,        r_l = s_l - f(s_{l-1}, x_l),

``A_l`` only sets how fast the iteration converges: the fixed point (``r =
0``), the convergence test (on ``ds``) and the prefix exactness (the first
active state is set to ``f`` of an exact state) do not depend on it. So a
position's ``c_l`` is estimated once, at the position's first evaluation (the
first iteration for a whole-chain solve; the iteration it enters the window
for a sliding window), and reused: later iterations evaluate ``f`` alone
there. An iteration over ``M`` positions of which ``k`` are new costs ``M``
evaluations of ``f`` and ``k`` VJPs, where re-estimating every iteration
costs ``M`` of each; a solve makes ``L`` VJPs in all.

No re-estimation. ``c_l`` is estimated at the state the position first sees
(its predecessor's latest iterate, or the guess a position entering the
window is given), not at the converged trajectory. Measured on the
denoising chains of ``benchmarks/diffusion_sampling.py`` (RESULTS.md,
"Denoising: Picard vs JVP-estimated quasi-Newton", session 3), the cached
estimate converges in the same number of iterations as one re-made every
iteration in 36 of 42 configurations and within one in the rest (either way),
so re-estimating where a state moved a lot would save at most that and cost
VJPs.

Shapes. The graphs are traced for fixed lengths (``make_fx`` with static
shapes), so the ``M`` evaluated positions are split into runs: the positions
with an estimate and the new ones (a suffix: positions enter in order), each
run evaluated by graphs for the lengths of its binary digits (powers of two
up to the window), a run of the full window or chain by its own graph.
:func:`prepare` traces them all when the program is built.
"""

from __future__ import annotations

import torch

from .program import windowed_steps


def traced_lengths(window: int) -> list[int]:
    """The run lengths :class:`CachedEstimates` evaluates over a window of ``window``: ``window`` and the powers of two below."""
    lengths = {window}
    power = 1
    while power < window:
        lengths.add(power)
        power *= 2
    return sorted(lengths)


def prepare(program, window: int, xs_leaves, shared) -> None:
    """Trace the forward and estimate graphs for every length :class:`CachedEstimates` uses with ``window``."""
    for length in traced_lengths(window):
        for jacobian in ("identity", "estimate"):
            windowed_steps(program, length, xs_leaves, shared, jacobian=jacobian)


class CachedEstimates:
    """``F`` and the cached ``A`` of one solve of ``program`` (``jacobian="estimate"``).

    ``scales`` ``(L, N, w)`` holds ``A_l`` (``c_l`` broadcast over the state's
    ``w`` values, the "diag" blocks of the linear solve) for positions
    ``[0, known)``. ``estimated`` counts the VJPs made (positions estimated).
    """

    def __init__(self, program, like: torch.Tensor):
        self.program = program
        self.scales = torch.empty_like(like)
        self.known = 0
        self.estimated = 0

    def __call__(self, prev, xs_leaves, shared, first: int, count: int):
        """``(F, A)`` at positions ``[first, first + count)``, each ``(count, N, w)``.

        ``prev`` ``(L, N, w)``: every position's input state ``s_{l-1}``;
        ``xs_leaves``: the per-step inputs over all ``L`` positions.
        ``F_l = f(prev_l, x_l)``; positions without an estimate (``l >= known``)
        are evaluated with their VJP and their ``A_l`` stored.
        """
        stop = first + count
        fresh = max(first, self.known)
        values = prev.new_empty(count, *prev.shape[1:])
        runs = ((first, fresh, "identity"), (fresh, stop, "estimate"))
        for start, end, jacobian in runs:
            for a, b in _pieces(start, end, count):
                graph = self._graph(b - a, jacobian, xs_leaves, shared)
                out = graph(prev[a:b], [leaf[a:b] for leaf in xs_leaves], shared)
                if jacobian == "identity":
                    values[a - first : b - first] = out
                else:
                    values[a - first : b - first], self.scales[a:b] = out
        if stop > self.known:
            self.estimated += stop - fresh
            self.known = stop
        return values, self.scales[first:stop]

    def _graph(self, length, jacobian, xs_leaves, shared):
        program = self.program
        if length == program.length:
            return program.steps_at if jacobian == "identity" else program.steps_and_jacobians
        return windowed_steps(program, length, xs_leaves, shared, jacobian=jacobian)


def _pieces(start: int, end: int, whole: int):
    """``[start, end)`` cut into runs of ``whole`` or of decreasing powers of two."""
    if end - start == whole:
        return [(start, end)]
    pieces = []
    while start < end:
        size = 1 << ((end - start).bit_length() - 1)
        pieces.append((start, start + size))
        start += size
    return pieces
