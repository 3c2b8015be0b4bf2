"""Every vocabulary and default of the solver, in one place.

The runtime, the passes (policy, lowering) and the backend's options read
their names and numbers from here, so that a threshold or a default cannot
differ between the backend's path and ``solve_chain``'s.
"""

from __future__ import annotations

import torch

# Blocks of the linearisation ``ds_l = A_l ds_{l-1} - r_l`` the PCR driver solves.
JACOBIAN_KINDS = ("full", "diag", "identity")
# Jacobians that are estimates, and the PCR blocks they are solved with.
JACOBIAN_ESTIMATES = {"estimate": "diag"}
JACOBIAN_CHOICES = ("auto", *JACOBIAN_KINDS, *JACOBIAN_ESTIMATES)
ADJOINT_CHOICES = ("auto", "parallel", "sequential")
FORWARD_CHOICES = ("parallel", "sequential")
# How a sequential forward runs: "exact" (eager's own kernels, bit for bit), "compiled" (a generated C loop where
# the step fits it, :mod:`seqpar.runtime.dense_step`) or "fused" (the step compiled by inductor and called per step,
# :mod:`seqpar.runtime.fused_loop`); the last two are chosen by the policy for cost, never for chaotic chains.
LOOP_CHOICES = ("exact", "compiled", "fused")

# Widest state (values per batch element) for dense Jacobian blocks (w^2 values each):
# "auto" takes full Jacobians and the parallel adjoint up to this width.
DENSE_WIDTH = 64

# Default relative stopping tolerance (``rtol``) by dtype, for Newton (full Jacobians).
DEFAULT_TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}
# Iterations that converge linearly (every Jacobian but the full one) stop at this fraction of the
# dtype's default tolerance in float32 and float64: their error after the last update is about
# rho / (1 - rho) times that update (rho the rate), where Newton's is about its square. Measured:
# a 40-layer float32 Llama stack solved by Picard ends 7x further from float64 than eager at 1e-5,
# as far as eager at 1e-6, for 19 iterations instead of 17. Half precision keeps its default (its
# stored states round at about 1e-3).
LINEAR_CONVERGENCE_FACTOR = 0.1
# Parallel iterations before the rest of a chain is evaluated sequentially.
DEFAULT_MAX_ITERS = 40
# On CPU an affine chain's one linear solve, and a parallel adjoint (diagonal or dense blocks), evaluate their
# positions in runs whose Jacobian blocks take at most CPU_RUN_BYTES (each run carries the exact state, or
# adjoint, of the one before: the same work), at least CPU_RUN_MIN positions: chain-sized temporaries cost a page
# fault per 4 KiB on every call (glibc returns large blocks to the system), miss the cache, and grow with L
# where eager's memory does not (benchmarks/RESULTS.md, "Structure" and "The dense adjoint in runs").
CPU_RUN_BYTES = 1 << 20
CPU_RUN_MIN = 32
# On every device one batched evaluation of a parallel solve holds Jacobian blocks of at most this share of the
# device's memory: the whole solve peaks at a small multiple of its blocks (:mod:`seqpar.runtime.budget`).
DEVICE_MEMORY_SHARE = 16
# Newton iterations between two host decisions (convergence, window advance, fallback) on a GPU: each decision
# reads back a few numbers (one synchronisation, tens of microseconds, and a break in a CUDA graph); between
# decisions the iterations run on the same active positions, which costs only work (a converged prefix stays
# exact). On a CPU the numbers are host values already: a decision every iteration.
CUDA_DECISION_EVERY = 4


def decision_every(device: torch.device) -> int:
    """Iterations per host decision of a Newton loop on ``device`` (:data:`CUDA_DECISION_EVERY` on CUDA, else 1)."""
    return CUDA_DECISION_EVERY if device.type == "cuda" else 1


def resolve_jacobian(jacobian: str, width: int, diagonal: bool = False) -> str:
    """The Jacobian a request means for a step of ``width`` state values per batch element.

    ``"auto"``: ``"full"`` for a diagonal step (its diagonal blocks cost ``w``
    values, exact at any width: :mod:`seqpar.runtime.structure`) and up to
    :data:`DENSE_WIDTH`, ``"identity"`` above. ``"diag"`` on a diagonal step is
    ``"full"``: the diagonal is the whole Jacobian (Newton, with Newton's
    tolerance). Any other request as it is.
    """
    if jacobian == "auto":
        return "full" if diagonal or width <= DENSE_WIDTH else "identity"
    return "full" if diagonal and jacobian == "diag" else jacobian


def resolve_adjoint(adjoint: str, width: int, diagonal: bool = False) -> str:
    """``"auto"``: ``"parallel"`` for a diagonal step (diagonal blocks) and up to :data:`DENSE_WIDTH`, else
    ``"sequential"``; any other request as it is."""
    if adjoint == "auto":
        return "parallel" if diagonal or width <= DENSE_WIDTH else "sequential"
    return adjoint


def linear_solve_kind(jacobian: str) -> str:
    """The PCR block kind of the linear solve for ``jacobian`` (``"estimate"`` -> ``"diag"``)."""
    return JACOBIAN_ESTIMATES.get(jacobian, jacobian)


def forward_block_kind(jacobian: str, diagonal: bool) -> str:
    """The blocks of a parallel forward's linear solve: ``"diag"`` for a diagonal step's exact Jacobian
    (``jacobian="full"``), else :func:`linear_solve_kind`."""
    return "diag" if diagonal and jacobian == "full" else linear_solve_kind(jacobian)


def default_max_iters(length: int, window: int | None) -> int:
    """Iterations allowed before the sequential fallback: :data:`DEFAULT_MAX_ITERS`, plus ``4 ceil(L / W)`` for a
    sliding window of ``W`` (each window needs a few iterations of its own), at most ``L`` (prefix exactness
    finishes at least one state per iteration)."""
    extra = 4 * -(-length // window) if window is not None and window < length else 0
    return min(DEFAULT_MAX_ITERS + extra, length)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype linear solves accumulate in: float32 for half precision, else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
