"""Symmetric positive definite block-tridiagonal solves: the Levenberg-Marquardt (ELK) step.

The Newton step of a chain solves the lower block-bidiagonal system ``J ds = c``
with ``J = I - S``: identity diagonal blocks and ``-A_l`` below them
(:mod:`seqpar.runtime.pcr`). The damped step of ELK (Gonzalez et al. 2024) is
the Levenberg-Marquardt step

    ds = argmin ||J ds - c||^2 + lambda ||ds||^2,     (J^T J + lambda I) ds = J^T c,

whose matrix ``T = J^T J + lambda I`` is block tridiagonal and SPD (its
eigenvalues are >= lambda). With ``M`` equations ``l = 0 .. M-1``:

    T_ll     = (1 + lambda) I + A_{l+1}^T A_{l+1}     (l < M-1),   T_{M-1,M-1} = (1 + lambda) I,
    T_l,l-1  = -A_l,       T_l-1,l = -A_l^T           (l >= 1; A_0 is not used),
    (J^T c)_l = c_l - A_{l+1}^T c_{l+1}               (l < M-1),   (J^T c)_{M-1} = c_{M-1}.

ELK solves it with a parallel Kalman smoother; here it is solved by parallel
cyclic reduction (:func:`solve_block_tridiagonal`), ``ceil(log2 M)`` steps of
batched ``w x w`` solves and products, SPD so without pivoting. The blocks are

* ``"full"``:     dense, ``(M, N, w, w)``: products are matmuls, solves ``torch.linalg.solve``;
* ``"diag"``:     diagonal, ``(M, N, w)``: ``N w`` independent scalar tridiagonal systems;
* ``"identity"``: ``A_l = I``: one scalar tridiagonal matrix, coefficients ``(M, 1, 1)``,
  shared by all ``N w`` right-hand sides.

The inputs are not modified; half and bfloat16 are solved in float32.
"""

from __future__ import annotations

import torch

from .pcr import combine_steps
from .spec import JACOBIAN_KINDS, accumulation_dtype


def levenberg_marquardt_step(A: torch.Tensor | None, c: torch.Tensor, kind: str, damping: float) -> torch.Tensor:
    """``ds`` with ``(J^T J + lambda I) ds = J^T c`` (module docstring), shaped like ``c`` ``(M, N, w)``.

    ``A``: ``(M, N, w, w)`` (``"full"``), ``(M, N, w)`` (``"diag"``) or ``None``
    (``"identity"``); ``A_0`` is not used. ``damping = lambda >= 0``; with
    ``lambda = 0`` this is the Newton step ``J ds = c`` (solved the long way:
    use :func:`~seqpar.runtime.pcr.solve_affine_recurrence` for that).
    """
    if kind not in JACOBIAN_KINDS:
        raise ValueError(f"kind must be one of {JACOBIAN_KINDS}, got {kind!r}")
    out_dtype, work = c.dtype, accumulation_dtype(c.dtype)
    c = c.to(work)
    length = c.shape[0]
    rhs = c.clone()
    if kind == "identity":
        D = c.new_full((length, 1, 1), 2.0 + damping)
        D[-1] = 1.0 + damping
        E = c.new_full((length, 1, 1), -1.0)
        rhs[:-1] -= c[1:]
    else:
        A = A.to(work)
        matrix = kind == "full"
        At = A.mT if matrix else A
        eye = torch.eye(c.shape[-1], dtype=work, device=c.device) if matrix else 1.0
        D = (1.0 + damping) * eye + torch.zeros_like(A)
        D[:-1] += At[1:] @ A[1:] if matrix else A[1:] * A[1:]
        E = -A
        rhs[:-1] -= (At[1:] @ c[1:].unsqueeze(-1)).squeeze(-1) if matrix else A[1:] * c[1:]
    return solve_block_tridiagonal(D, E, rhs, kind).to(out_dtype)


def solve_block_tridiagonal(D: torch.Tensor, E: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Solve the SPD block-tridiagonal ``T x = b`` by parallel cyclic reduction; returns ``x`` like ``b``.

    ``T_ll = D_l`` (symmetric), ``T_l,l-1 = E_l``, ``T_l-1,l = E_l^T`` (``E_0``
    is not used). ``b``: ``(M, N, w)``; ``D``, ``E``: ``(M, N, w, w)``
    (``"full"``), or broadcastable to ``b`` (``"diag"``: ``(M, N, w)``;
    ``"identity"``: ``(M, 1, 1)``), where the "blocks" are scalars and ``E^T = E``.

    Step ``k`` (``d = 2**k``) eliminates from every equation ``i`` its
    neighbours ``i - d`` and ``i + d`` (zero outside ``0 .. M-1``)::

        D_i <- D_i - E_i D_{i-d}^{-1} E_i^T - E_{i+d}^T D_{i+d}^{-1} E_{i+d}
        b_i <- b_i - E_i D_{i-d}^{-1} b_{i-d} - E_{i+d}^T D_{i+d}^{-1} b_{i+d}
        E_i <- -E_i D_{i-d}^{-1} E_{i-d}

    The equations ``i = r mod 2d`` then form a Schur complement of ``T``
    (symmetric, SPD: no pivoting needed), coupled at distance ``2d``; ``E_i = 0``
    for ``i < 2d``. After ``ceil(log2 M)`` steps nothing is coupled: ``x_i = D_i^{-1} b_i``.
    """
    matrix = kind == "full"
    work = accumulation_dtype(b.dtype)
    D, E, b = D.to(work, copy=True), E.to(work, copy=True), b.to(work, copy=True)
    E[0] = 0
    if matrix:
        b = b.unsqueeze(-1)
        mul, tr = torch.matmul, (lambda X: X.mT)
    else:
        mul, tr = torch.mul, (lambda X: X)
    steps = combine_steps(b.shape[0])
    for k in range(steps):
        d = 1 << k
        # Z_j = D_j^{-1} [E_j, b_j, E_{j+d}^T]; E rolled by -d is E_{j+d} (E_j = 0 for j < d wraps in).
        Z_E, Z_b, Z_up = _solve(D, (E, b, tr(E.roll(-d, 0))), matrix)
        Ed = E[d:]
        D[d:] -= mul(Ed, Z_up[:-d])
        D[:-d] -= mul(tr(Ed), Z_E[d:])
        b[d:] -= mul(Ed, Z_b[:-d])
        b[:-d] -= mul(tr(Ed), Z_b[d:])
        if k + 1 < steps:
            E[d:] = -mul(Ed, Z_E[:-d])
    (x,) = _solve(D, (b,), matrix)
    return x.squeeze(-1) if matrix else x


def _solve(D, blocks, matrix):
    """``D^{-1} X`` for every ``X`` in ``blocks``: one batched LU for all (dense), one reciprocal (scalar)."""
    if not matrix:
        inverse = D.reciprocal()
        return [inverse * X for X in blocks]
    Z = torch.linalg.solve_ex(D, torch.cat(blocks, dim=-1))[0]  # a singular D gives non-finite values
    return Z.split([X.shape[-1] for X in blocks], dim=-1)
