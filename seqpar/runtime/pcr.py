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

On CPU, :func:`solve_affine_recurrence` hands float32/float64 systems to the
compiled forward substitution of :mod:`seqpar.runtime.kernels.cpu_scan` by default
(``method="auto"``): with a few cores, depth buys nothing and the combine
steps below cost ~50 small torch operations per solve. The combine steps stay
the method on GPU (Triton), without a C compiler, and with ``method="pcr"``.

How the combine steps run on CPU (all exact rewrites of the same recursion):

* every step updates its buffers in place; with separate ``A`` and ``c``,
  ``A_l`` is only updated where a later step reads it (``l >= 2d``), and the
  last step updates ``c`` alone;
* small dense blocks (``w <=`` :data:`SMALL_WIDTH`) are combined in
  "structure of arrays" layout ``(w+1, w+1, L*N)`` as homogeneous blocks
  ``H_l = [[A_l, c_l], [0, 1]]``: one step is ``H_l <- H_l H_{l-d}``, a
  broadcast multiply-and-sum whose innermost dimension runs over the ``L*N``
  blocks (batched ``bmm`` on 2x2..5x5 matrices runs at a fraction of that speed);
* wider blocks use batched ``matmul`` in ``(L, N, w, w)`` layout;
* long systems (see :func:`_use_chunks`) take a work-efficient two-level
  scan: each of ``P`` chunks of ``C`` consecutive equations is reduced sequentially (``C`` steps, each over all ``P`` chunks at
  once), the ``P`` chunk totals by recursive doubling, and a last batched step
  adds each chunk's incoming state: about ``2 L`` block products instead of
  ``L log2 L``.

The number and shapes of the combine steps depend only on ``(L, N, w)``, so
the driver traces to a static graph for ``torch.compile``.
"""

from __future__ import annotations

import torch

from .kernels import cpu_scan
from .spec import JACOBIAN_KINDS, accumulation_dtype

SOLVE_METHODS = ("auto", "pcr", "substitution")
# Widest dense block combined in the homogeneous structure-of-arrays layout
# (measured faster than batched matmul up to w = 4 on a 2-core CPU).
SMALL_WIDTH = 4
# When the work-efficient chunked scan replaces recursive doubling (measured on
# a 2-core CPU: doubling needs fewer, larger operations and wins on short
# systems; the chunked scan does about 2 L instead of L log2 L block products).
CHUNK_MIN_LENGTH = 64
CHUNK_THRESHOLD = 1024  # blocks (L * N), for small dense blocks
DIAGONAL_CHUNK_THRESHOLD = 32768  # blocks, for diagonal blocks


def _use_chunks(length: int, batch: int, kind: str) -> bool:
    """Whether the two-level scan beats recursive doubling for this shape.

    ``kind``: ``"homogeneous"`` (small dense blocks), ``"dense"`` (batched
    matmul blocks: every product is expensive, so from ``L >= 64`` on) or ``"diag"``.
    """
    if length < CHUNK_MIN_LENGTH:
        return False
    if kind == "dense":
        return True
    threshold = DIAGONAL_CHUNK_THRESHOLD if kind == "diag" else CHUNK_THRESHOLD
    return length * batch >= threshold


def combine_steps(length: int) -> int:
    """Number of recursive-doubling steps for ``length`` equations: ceil(log2 L)."""
    return max(0, (length - 1).bit_length())


def solve_affine_recurrence(
    A: torch.Tensor | None, c: torch.Tensor, kind: str, *, reverse: bool = False, method: str = "auto"
) -> torch.Tensor:
    """Solve the affine recurrence (PCR: O(log L) depth; CPU: substitution) and return ``y`` shaped like ``c``.

    Forward (``reverse=False``): ``y_l = A_l y_{l-1} + c_l`` with ``y_{-1} = 0``.

    Reverse (``reverse=True``): ``y_l = A_{l+1}^T y_{l+1} + c_l`` with
    ``y_L = 0``; ``A_0`` is not used. This is the transposed system
    ``(I - S)^T y = c`` of the forward ``(I - S) y = c``, the adjoint recursion
    ``lam_{l-1} = g_{l-1} + J_l^T lam_l`` of implicit differentiation.

    The result has ``c``'s dtype; the combine steps run in
    :func:`~seqpar.runtime.spec.accumulation_dtype`. The inputs are not modified.

    ``method``: ``"pcr"`` (the combine steps above; on CUDA the Triton kernels
    when Triton is installed), ``"substitution"`` (CPU only: the compiled
    forward substitution of :mod:`seqpar.runtime.kernels.cpu_scan`, ``O(L N w^2)``
    work in one pass) or ``"auto"``: substitution for CPU tensors whenever
    its kernel is available, PCR otherwise. ``"identity"``
    is always a ``cumsum``. Not differentiable: inputs that require grad
    raise ``ValueError`` (solve it under ``torch.no_grad()``).
    """
    if kind not in JACOBIAN_KINDS:
        raise ValueError(f"kind must be one of {JACOBIAN_KINDS}, got {kind!r}")
    if method not in SOLVE_METHODS:
        raise ValueError(f"method must be one of {SOLVE_METHODS}, got {method!r}")
    if torch.is_grad_enabled() and (c.requires_grad or (A is not None and A.requires_grad)):
        raise ValueError(
            "solve_affine_recurrence is not differentiable (A or c requires grad): call it under "
            "torch.no_grad(); solve_chain differentiates chains by its own adjoint solve"
        )
    if c.is_cuda and method != "substitution":
        from .kernels import triton_pcr  # only on CUDA: a CPU run never imports Triton

        if triton_pcr.available():
            return triton_pcr.solve_affine_recurrence(A, c, kind, reverse=reverse)
    out_dtype = c.dtype
    work = accumulation_dtype(c.dtype)
    if kind == "identity":
        c = c.to(work)
        y = torch.cumsum(c.flip(0), dim=0).flip(0) if reverse else torch.cumsum(c, dim=0)
        return y.to(out_dtype)
    if method != "pcr":
        y = _substitute(A, c, kind, reverse, work, required=method == "substitution")
        if y is not None:
            return y.to(out_dtype)
    length, batch, width = c.shape
    if kind == "full" and width <= SMALL_WIDTH:
        y = _solve_homogeneous(A, c, work, reverse)
    elif kind == "full":
        y = _solve_blocks(A, c, work, reverse, "dense")
    else:
        y = _solve_blocks(A, c, work, reverse, "diag")
    return y.to(out_dtype)


def _substitute(A, c, kind, reverse, work, *, required):
    """The compiled substitution's ``y`` in ``work``, or ``None`` (``required``: raise instead)."""
    A, c = A.to(work), c.to(work)
    if cpu_scan.supports(A, c):
        reason = cpu_scan.disabled_reason(work)
        if reason is None:
            return cpu_scan.solve(A, c, kind, reverse)
    else:
        reason = "it takes CPU float32/float64 tensors, outside torch.compile"
    if required:
        raise ValueError(f"method='substitution' cannot solve this system: {reason}")
    return None


def _reversed_blocks(A: torch.Tensor, kind: str) -> torch.Tensor:
    """``B_m = A_{L-m}^T`` for ``m >= 1`` (``B_0 = 0``, unused): the reverse system as a forward one.

    With ``m = L-1-l`` the reverse recursion is ``z_m = B_m z_{m-1} + c_{L-1-m}``.
    """
    B = torch.empty_like(A)
    B[0].zero_()
    if A.shape[0] > 1:
        flipped = A[1:].flip(0)
        B[1:].copy_(flipped.transpose(-1, -2) if kind == "full" else flipped)
    return B


# ---------------------------------------------------------------- diagonal blocks


def _solve_blocks(A, c, work, reverse, layout):
    """Diagonal (``(L, N, w)``) or wide dense (``(L, N, w, w)``) blocks: the two-level
    scan for long systems, recursive doubling otherwise; reversed on flipped copies."""
    kind = "diag" if layout == "diag" else "full"
    if reverse:
        A, c = _reversed_blocks(A.to(work), kind), c.to(work).flip(0)
    else:
        A, c = A.to(work, copy=True), c.to(work, copy=True)
    chunked, doubling = _BLOCK_SOLVERS[layout]
    if _use_chunks(c.shape[0], c.shape[1], layout):
        y = chunked(A, c)
    else:
        doubling(A, c)
        y = c
    return y.flip(0) if reverse else y


def _doubling_diagonal(a, c):
    """Recursive doubling in place on dim 0: afterwards ``c`` holds ``y``."""
    length = c.shape[0]
    steps = combine_steps(length)
    for k in range(steps):
        d = 1 << k
        c[d:] += a[d:] * c[:-d]
        if 2 * d < length and k + 1 < steps:
            a[2 * d :] = a[2 * d :] * a[d:-d]


def _chunk_size(length: int, batch: int) -> int:
    """Chunk length ``C`` of the two-level scan: 8, or 16 for more than 32768 blocks (measured)."""
    return 16 if length * batch > 32768 else 8


def _chunked_diagonal(a, c):
    """Two-level scan of the elementwise recursion (see the module docstring)."""
    length = c.shape[0]
    size = _chunk_size(length, c.shape[1])
    chunks = -(-length // size)
    padded = chunks * size
    if padded != length:  # trailing equations never influence earlier ones
        a = torch.cat([a, a.new_zeros(padded - length, *a.shape[1:])])
        c = torch.cat([c, c.new_zeros(padded - length, *c.shape[1:])])
    a4 = a.view(chunks, size, *a.shape[1:])
    c4 = c.view(chunks, size, *c.shape[1:])
    for j in range(1, size):  # local scan inside every chunk
        c4[:, j] += a4[:, j] * c4[:, j - 1]
        a4[:, j] *= a4[:, j - 1]
    carry_a, carry_c = a4[:, -1].clone(), c4[:, -1].clone()
    _doubling_diagonal(carry_a, carry_c)  # carry_c[p] = y at the end of chunk p
    c4[1:] += a4[1:] * carry_c[:-1].unsqueeze(1)
    return c[:length]


# ------------------------------------------------------- small dense blocks (SoA)


def _solve_homogeneous(A, c, work, reverse):
    """Dense blocks with ``w <= SMALL_WIDTH`` in homogeneous structure-of-arrays layout."""
    length, batch, width = c.shape
    if _use_chunks(length, batch, "homogeneous"):
        if reverse:
            A, c = _reversed_blocks(A, "full"), c.flip(0)
        y = _chunked_homogeneous(A, c, work)
        return y.flip(0) if reverse else y
    size = width + 1
    H = c.new_zeros(size, size, length, batch, dtype=work)
    if reverse:
        H[:width, :width, 1:].copy_(A[1:].flip(0).permute(3, 2, 0, 1))
        H[:width, width].copy_(c.flip(0).permute(2, 0, 1))
    else:
        H[:width, :width].copy_(A.permute(2, 3, 0, 1))
        H[:width, width].copy_(c.permute(2, 0, 1))
    H[width, width] = 1
    y = _doubling_homogeneous(H.view(size, size, length * batch), batch)
    y = y.view(width, length, batch).permute(1, 2, 0)
    return y.flip(0) if reverse else y.contiguous()


def _compose(X, Y, out=None):
    """Block products ``X_m @ Y_m`` of ``(b, b, M)`` stacks (any trailing block dims).

    ``out`` may be ``X`` itself (or overlap it): the products are formed before it is written.
    """
    return torch.sum(X.unsqueeze(2) * Y.unsqueeze(0), 1, out=out)


def _apply(X, y, out=None):
    """Block-vector products ``X_m @ y_m``: ``(r, b, M) x (b, M) -> (r, M)`` (``out`` as in :func:`_compose`)."""
    return torch.sum(X * y.unsqueeze(0), 1, out=out)


def _doubling_homogeneous(H, batch):
    """Recursive doubling on ``H`` of shape ``(b, b, L*N)``, in place; returns ``y`` as ``(w, L*N)``.

    Block ``l`` of batch element ``n`` sits at ``l * N + n``, so "``d``
    equations back" is ``d * N`` positions back.
    """
    width = H.shape[0] - 1
    length = H.shape[-1] // batch
    steps = combine_steps(length)
    for k in range(steps):
        d = (1 << k) * batch
        if k + 1 < steps:
            _compose(H[..., d:], H[..., :-d], out=H[..., d:])
        else:  # last step: only the c column is read afterwards
            _apply(H[:width, :, d:], H[:, width, :-d], out=H[:width, width, d:])
    return H[:width, width]


def _chunked_homogeneous(A, c, work):
    """Two-level scan with homogeneous blocks; returns ``y`` as ``(L, N, w)``.

    Layout ``(C, b, b, P, N)``: equation ``p * C + j`` is block ``[j, :, :, p, n]``,
    so the ``C`` local steps read and write contiguous ``(b, b, P, N)`` slabs.
    """
    length, batch, width = c.shape
    size_b = width + 1
    size = _chunk_size(length, batch)
    chunks = -(-length // size)
    padded = chunks * size
    if padded != length:  # trailing equations never influence earlier ones
        A = torch.cat([A, A.new_zeros(padded - length, *A.shape[1:])])
        c = torch.cat([c, c.new_zeros(padded - length, *c.shape[1:])])
    H = c.new_zeros(size, size_b, size_b, chunks, batch, dtype=work)
    H[:, :width, :width].copy_(A.view(chunks, size, batch, width, width).permute(1, 3, 4, 0, 2))
    H[:, :width, width].copy_(c.view(chunks, size, batch, width).permute(1, 3, 0, 2))
    H[:, width, width] = 1
    for j in range(1, size):  # local scan inside every chunk, all chunks at once
        _compose(H[j], H[j - 1], out=H[j])
    # Chunk totals, combined in place: afterwards H[-1]'s c column is y at every chunk's end.
    _doubling_homogeneous(H[-1].view(size_b, size_b, chunks * batch), batch)
    ends = H[-1, :width, width]  # (w, P, N)
    y = H[:, :width, width].clone()  # (C, w, P, N)
    # y at position j < C-1 of chunk p: A_pj y_end(p-1) + c_pj, with the local A_pj, c_pj.
    y[:-1, :, 1:] += (H[:-1, :width, :width, 1:] * ends[:, :-1]).sum(2)
    return y.permute(2, 0, 3, 1).reshape(padded, batch, width)[:length]


# ------------------------------------------------------------ wide dense blocks


def _doubling_dense(A, c):
    """Recursive doubling in place on dim 0: afterwards ``c`` holds ``y``."""
    length = c.shape[0]
    steps = combine_steps(length)
    for k in range(steps):
        d = 1 << k
        c[d:] += torch.matmul(A[d:], c[:-d].unsqueeze(-1)).squeeze(-1)
        if 2 * d < length and k + 1 < steps:
            A[2 * d :] = torch.matmul(A[2 * d :], A[d:-d])


def _chunked_dense(A, c):
    """Two-level scan with dense blocks (see the module docstring)."""
    length = c.shape[0]
    size = _chunk_size(length, c.shape[1])
    chunks = -(-length // size)
    padded = chunks * size
    if padded != length:
        A = torch.cat([A, A.new_zeros(padded - length, *A.shape[1:])])
        c = torch.cat([c, c.new_zeros(padded - length, *c.shape[1:])])
    A5 = A.view(chunks, size, *A.shape[1:])
    c4 = c.view(chunks, size, *c.shape[1:])
    for j in range(1, size):
        c4[:, j] += torch.matmul(A5[:, j], c4[:, j - 1].unsqueeze(-1)).squeeze(-1)
        A5[:, j] = torch.matmul(A5[:, j], A5[:, j - 1])
    carry_A, carry_c = A5[:, -1].clone(), c4[:, -1].clone()
    _doubling_dense(carry_A, carry_c)
    c4[1:] += torch.matmul(A5[1:], carry_c[:-1].unsqueeze(1).unsqueeze(-1)).squeeze(-1)
    return c[:length]


_BLOCK_SOLVERS = {"diag": (_chunked_diagonal, _doubling_diagonal), "dense": (_chunked_dense, _doubling_dense)}
