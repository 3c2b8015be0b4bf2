"""Parallel Cyclic Reduction for lower block-bidiagonal systems.

One driver solves every linear system seqpar needs: the Newton step of the
forward solve and the adjoint of the backward pass. The system is the affine
recurrence

    y_l = A_l y_{l-1} + c_l,    l = 0 .. L-1,    y_{-1} = 0,

i.e. the block-bidiagonal system ``y_l - A_l y_{l-1} = c_l``. ``A_l`` is one of

* ``"full"``:     dense blocks, ``A`` of shape ``(L, N, w, w)``;
* ``"diag"``:     diagonal blocks, ``A`` of shape ``(L, N, w)``;
* ``"identity"``: ``A_l = I`` (``A`` is ``None``): the solution is a prefix sum.

``c`` has shape ``(L, N, w)``: ``N`` independent batch elements with states of
``w`` values. Recursive doubling (Hillis-Steele / PCR on the bidiagonal system)
takes ``ceil(log2 L)`` combine steps; at step ``k`` with ``d = 2**k`` every
equation ``l >= d`` absorbs equation ``l - d``::

    c_l <- A_l c_{l-d} + c_l,       A_l <- A_l A_{l-d}.

After the last step ``y_l = c_l``: the coefficients left in ``A`` multiply
``y_{-1} = 0``. Half and bfloat16 inputs are combined in float32.
"""

from __future__ import annotations

import torch

JACOBIAN_KINDS = ("full", "diag", "identity")


def combine_steps(length: int) -> int:
    """Number of recursive-doubling steps for ``length`` equations: ceil(log2 L)."""
    return max(0, (length - 1).bit_length())


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half and bfloat16, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def solve_affine_recurrence(
    A: torch.Tensor | None, c: torch.Tensor, kind: str, *, reverse: bool = False
) -> torch.Tensor:
    """Solve the affine recurrence in O(log L) depth and return ``y`` shaped like ``c``.

    Forward (``reverse=False``): ``y_l = A_l y_{l-1} + c_l`` with ``y_{-1} = 0``.

    Reverse (``reverse=True``): ``y_l = A_{l+1}^T y_{l+1} + c_l`` with
    ``y_L = 0``; ``A_0`` is not used. This is the transposed system
    ``(I - S)^T y = c`` of the forward ``(I - S) y = c``, the adjoint recursion
    ``lam_{l-1} = g_{l-1} + J_l^T lam_l`` of implicit differentiation.

    The result has ``c``'s dtype; the combine steps run in
    :func:`accumulation_dtype`. CUDA tensors go to the Triton kernels when
    Triton is installed.
    """
    if kind not in JACOBIAN_KINDS:
        raise ValueError(f"kind must be one of {JACOBIAN_KINDS}, got {kind!r}")
    if c.is_cuda:
        from . import triton_pcr

        if triton_pcr.available():
            return triton_pcr.solve_affine_recurrence(A, c, kind, reverse=reverse)
    out_dtype = c.dtype
    work = accumulation_dtype(c.dtype)
    c = c.to(work)
    if A is not None:
        A = A.to(work)
    if reverse:
        A, c = _reversed_system(A, c, kind)
    y = _recursive_doubling(A, c, kind)
    if reverse:
        y = y.flip(0)
    return y.to(out_dtype)


def _reversed_system(A, c, kind):
    """Rewrite the reverse recursion as a forward one on flipped indices.

    With ``m = L-1-l``: ``z_m = B_m z_{m-1} + c_{L-1-m}``, ``B_m = A_{L-m}^T``
    (``B_0`` unused, set to ``A_0``'s transpose to keep shapes).
    """
    c = c.flip(0)
    if kind == "identity":
        return None, c
    B = torch.cat([A[:1], A[1:].flip(0)], dim=0)
    if kind == "full":
        B = B.transpose(-1, -2)
    return B, c


def _recursive_doubling(A, c, kind):
    length = c.shape[0]
    if kind == "identity":
        return torch.cumsum(c, dim=0)
    c = c.clone()
    c_next = torch.empty_like(c)
    if length > 1:
        A = A.clone()
        A_next = torch.empty_like(A)
    steps = combine_steps(length)
    for k in range(steps):
        d = 1 << k
        c_next[:d].copy_(c[:d])
        if kind == "full":
            torch.matmul(A[d:], c[:-d].unsqueeze(-1), out=c_next[d:].unsqueeze(-1))
        else:
            torch.mul(A[d:], c[:-d], out=c_next[d:])
        c_next[d:].add_(c[d:])
        c, c_next = c_next, c
        if k + 1 < steps:
            A_next[:d].copy_(A[:d])
            if kind == "full":
                torch.matmul(A[d:], A[:-d], out=A_next[d:])
            else:
                torch.mul(A[d:], A[:-d], out=A_next[d:])
            A, A_next = A_next, A
    return c
