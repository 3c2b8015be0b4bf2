"""Triton kernels for the affine recurrence of :mod:`seqpar.runtime.pcr`.

Solves, for ``N`` independent batch elements of ``w`` values each,

    forward (``reverse=False``):  y_l = A_l y_{l-1} + c_l,          y_{-1} = 0,
    reverse (``reverse=True``):   y_l = A_{l+1}^T y_{l+1} + c_l,    y_L = 0,

``l = 0 .. L-1``, with ``A`` of shape ``(L, N, w, w)`` (``"full"``),
``(L, N, w)`` (``"diag"``) or ``None`` (``"identity"``, ``A_l = I``) and ``c``
of shape ``(L, N, w)``. The result has ``c``'s shape and dtype; the arithmetic
runs in :func:`~seqpar.runtime.spec.accumulation_dtype` (float32 for half and
bfloat16).

Instead of ``log2 L`` full passes over memory the solve is chunked (the
Thomas-then-reduce layout of ParaRNN, the chunked scan of accelerated-scan).
The chain is cut into ``K = ceil(L / C)`` chunks of ``C`` steps; a program holds
one chunk of one batch element (``"full"``) or of a block of channels
(``"diag"``, ``"identity"``, whose channels are independent) in registers:

1. each chunk computes, from a zero incoming state, its affine map
   ``(P_k, b_k)``: forward, ``e_k = P_k e_{k-1} + b_k`` for the chunk-end
   states ``e_k``, with ``P_k = A_{end-1} .. A_{start}``;
2. the ``K`` chunk maps form a recurrence of the same kind, ``K`` long, solved
   by the same driver (recursively, until a single chunk is left);
3. each chunk runs again from its true incoming state and writes ``y``.

Dense blocks step through a chunk sequentially (a ``w x w`` tile in registers,
``tl.dot`` for the map's product from ``w >= 16``); diagonal and identity
chunks are a ``(C, channels)`` tile reduced by ``tl.associative_scan`` over
affine pairs (``tl.cumsum`` for identity). Either way the chain is read a few
times in all, not once per ``log2 L`` round, in ``ceil(log_C L)`` levels.
The reverse solve is the same kernel: the transposition of ``A`` and the index
shift ``l -> l + 1`` are done in its address arithmetic, no flipped copy is made.
"""

from __future__ import annotations

import os

import torch

from ..spec import JACOBIAN_KINDS, accumulation_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

DEFAULT_CHUNK = {"full": 32, "diag": 128, "identity": 128}
"""Steps per chunk (a power of two): dense blocks step sequentially, the others scan a tile."""
CHANNEL_BLOCK = 32
"""Channels per program for ``"diag"`` and ``"identity"`` (``"full"``: one batch element)."""

_KIND_CODE = {kind: code for code, kind in enumerate(JACOBIAN_KINDS)}  # full 0, diag 1, identity 2


def available() -> bool:
    """True iff Triton imports and can run here: a CUDA device, or ``TRITON_INTERPRET=1``."""
    if triton is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def solve_affine_recurrence(
    A: torch.Tensor | None, c: torch.Tensor, kind: str, *, reverse: bool = False
) -> torch.Tensor:
    """``y`` shaped like ``c``: the forward or reverse recurrence of the module docstring.

    Same contract as :func:`seqpar.runtime.pcr.solve_affine_recurrence` (``A`` is
    ignored for ``"identity"``), through the op ``seqpar::triton_affine_recurrence``.
    """
    if kind not in JACOBIAN_KINDS:
        raise ValueError(f"kind must be one of {JACOBIAN_KINDS}, got {kind!r}")
    if kind == "identity":
        A = None
    _check_shapes(A, c, kind)
    return triton_affine_recurrence(A, c, kind, reverse)


def _check_shapes(A, c, kind):
    """``c``: ``(L, N, w)``; ``A``: ``(L, N, w, w)`` for full, ``(L, N, w)`` for diag."""
    if c.dim() != 3:
        raise ValueError(f"c must have shape (L, N, w), got {tuple(c.shape)}")
    expected = {"full": (*c.shape, c.shape[-1]), "diag": tuple(c.shape), "identity": None}[kind]
    shape = None if A is None else tuple(A.shape)
    if shape != expected:
        raise ValueError(
            f"kind {kind!r} with c of shape {tuple(c.shape)} needs A of shape {expected}, got {shape}"
        )


@torch.library.custom_op("seqpar::triton_affine_recurrence", mutates_args=())
def triton_affine_recurrence(
    A: torch.Tensor | None, c: torch.Tensor, kind: str, reverse: bool
) -> torch.Tensor:
    """The affine recurrence by the chunked Triton kernels; ``y`` shaped like ``c``."""
    if c.numel() == 0:
        return torch.empty_like(c)
    return solve_chunked(None if A is None else A.contiguous(), c.contiguous(), kind, reverse)


@triton_affine_recurrence.register_fake
def _triton_affine_recurrence_fake(A, c, kind, reverse):
    return torch.empty_like(c)


def solve_chunked(A, c, kind, reverse, chunk=None, out_dtype=None, *, launch=None):
    """``y`` (``(L, N, w)``, ``out_dtype``, default ``c``'s) by chunks of ``chunk`` steps.

    ``A`` and ``c`` are contiguous; ``chunk`` is a power of two (default
    :data:`DEFAULT_CHUNK`). With ``K = ceil(L / chunk) > 1`` the chunk maps
    ``(P, b)``, ``P`` shaped like ``A`` and ``b`` like ``c`` with ``K`` rows,
    are solved recursively: forward their solution ``e_k`` is the state at the
    end of chunk ``k``; reverse, row ``k + 1`` of ``P`` holds
    ``A_{end} .. A_{start+1}`` and the solution is the state at the start of
    chunk ``k``.

    ``launch`` runs one pass, called as :func:`_launch` is (its default); the
    ahead-of-time enumeration (:mod:`seqpar.runtime.kernels.triton_aot`) passes
    one that records the launch on meta tensors instead.
    """
    chunk = chunk or DEFAULT_CHUNK[kind]
    launch = launch or _launch
    out = torch.empty_like(c, dtype=out_dtype or c.dtype)
    chunks = triton.cdiv(c.shape[0], chunk)
    if chunks == 1:
        launch(A, c, None, out, None, kind, reverse, chunk, summary=False)
        return out
    work = accumulation_dtype(c.dtype)
    b = torch.empty((chunks, *c.shape[1:]), dtype=work, device=c.device)
    P = None if A is None else torch.empty((chunks, *A.shape[1:]), dtype=work, device=c.device)
    launch(A, c, None, b, P, kind, reverse, chunk, summary=True)
    boundary = solve_chunked(P, b, kind, reverse, chunk, launch=launch)
    launch(A, c, boundary, out, None, kind, reverse, chunk, summary=False)
    return out


def _launch(A, c, incoming, out, maps, kind, reverse, chunk, *, summary):
    """One pass of :func:`_chunk_kernel` over all chunks (its arguments: :func:`launch_arguments`)."""
    grid, args, meta = launch_arguments(A, c, incoming, out, maps, kind, reverse, chunk, summary=summary)
    _chunk_kernel[grid](*args, **meta)


def launch_arguments(A, c, incoming, out, maps, kind, reverse, chunk, *, summary):
    """``(grid, args, meta)`` of one pass: ``_chunk_kernel[grid](*args, **meta)``; unused pointers get ``c``.

    ``meta`` holds the constexprs (``CHUNK``, ``BLOCK``, ``KIND``, ``REVERSE``, ``SUMMARY``,
    ``USE_DOT``, ``ACC``) and ``num_warps``: every choice of kernel specialisation is made here.
    """
    length, batch, width = c.shape
    channels = batch * width
    lanes = width if kind == "full" else min(CHANNEL_BLOCK, triton.next_power_of_2(channels))
    block = triton.next_power_of_2(lanes)
    work = accumulation_dtype(c.dtype)
    tile = block * block if kind == "full" else chunk * block
    grid = (triton.cdiv(channels, lanes), triton.cdiv(length, chunk))
    args = (
        c if A is None else A,
        c,
        c if incoming is None else incoming,
        out,
        c if maps is None else maps,
        length,
        grid[1],
        channels,
        lanes,
    )
    meta = dict(
        CHUNK=chunk,
        BLOCK=block,
        KIND=_KIND_CODE[kind],
        REVERSE=int(reverse),
        SUMMARY=summary,
        USE_DOT=kind == "full" and block >= 16 and work == torch.float32,
        ACC=tl.float64 if work == torch.float64 else tl.float32,
        num_warps=max(1, min(4, tile // 256)),
    )
    return grid, args, meta


if triton is not None:
    FULL: tl.constexpr = tl.constexpr(_KIND_CODE["full"])
    DIAG: tl.constexpr = tl.constexpr(_KIND_CODE["diag"])

    @triton.jit
    def _and_scalar(valid, lanes, flag):
        """``valid & flag`` for a scalar ``flag``, spelled as a lane comparison because
        the Triton interpreter gives splatted booleans an integer dtype."""
        return valid & (lanes * 0 + flag.to(tl.int32) > 0)

    @triton.jit
    def _block_offsets(lanes, V, TRANSPOSE: tl.constexpr):
        """Offsets of a ``V x V`` row-major block as a ``(BLOCK, BLOCK)`` tile, transposed if asked."""
        rows = lanes[:, None]
        cols = lanes[None, :]
        if TRANSPOSE:
            return cols * V + rows
        return rows * V + cols

    @triton.jit
    def _compose(T, P, USE_DOT: tl.constexpr):
        """``T P`` of two tiles: ``tl.dot`` for tiles of 16 and more, broadcast-multiply-sum below."""
        if USE_DOT:
            return tl.dot(T, P, input_precision="ieee")
        return tl.sum(T[:, :, None] * P[None, :, :], axis=1)

    @triton.jit
    def _affine_combine(a_first, b_first, a_then, b_then):
        """Compose ``y -> a_first y + b_first`` with ``y -> a_then y + b_then`` (first applied first)."""
        return a_first * a_then, a_then * b_first + b_then

    @triton.jit
    def _sequential_chunk(A_ptr, c_ptr, out_ptr, P_ptr, y, k, start, L, K, D, V, v, lanes, valid,
                          CHUNK: tl.constexpr, REVERSE: tl.constexpr, SUMMARY: tl.constexpr,
                          USE_DOT: tl.constexpr, ACC: tl.constexpr):
        """Dense blocks: step through the chunk, ``y <- T_l y + c_l`` with the ``(BLOCK, BLOCK)`` tile
        ``T_l = A_l`` (``A_{l+1}^T`` if REVERSE, walking backwards), and compose ``P <- T_l P``.

        SUMMARY writes the chunk's ``y`` and ``P`` (transposed back if REVERSE), else every ``y_l``.
        """
        steps = tl.minimum(start + CHUNK, L) - start
        P = (lanes[:, None] == lanes[None, :]).to(ACC)
        block = v * V * V + _block_offsets(lanes, V, REVERSE)
        for i in range(steps):
            if REVERSE:
                l = start + steps - 1 - i
            else:
                l = start + i
            c_l = tl.load(c_ptr + l * D + v * V + lanes, mask=valid, other=0.0).to(ACC)
            has_operator = _and_scalar(valid, lanes, l + REVERSE < L)
            T = tl.load(A_ptr + (l + REVERSE) * D * V + block,
                        mask=has_operator[:, None] & valid[None, :], other=0.0).to(ACC)
            y = tl.sum(T * y[None, :], axis=1) + c_l
            if SUMMARY:
                P = _compose(T, P, USE_DOT)
            else:
                tl.store(out_ptr + l * D + v * V + lanes, y, mask=valid)
        if SUMMARY:
            tl.store(out_ptr + k * D + v * V + lanes, y, mask=valid)
            stored = _and_scalar(valid, lanes, k + REVERSE < K)
            tl.store(P_ptr + (k + REVERSE) * D * V + block, P, mask=stored[:, None] & valid[None, :])

    @triton.jit
    def _scanned_chunk(A_ptr, c_ptr, out_ptr, P_ptr, y, k, start, L, K, D, channel, valid,
                       CHUNK: tl.constexpr, KIND: tl.constexpr, REVERSE: tl.constexpr,
                       SUMMARY: tl.constexpr, ACC: tl.constexpr):
        """Diagonal and identity operators: the chunk as a ``(CHUNK, BLOCK)`` tile, its prefix maps
        ``(a, b)`` by an associative scan along the steps (a cumulative sum for identity).

        Steps past ``L`` are the identity map ``(1, 0)``, so the chunk's own map is the
        scan's last row (first row if REVERSE). SUMMARY writes it, else ``y = a y_in + b``.
        """
        rows = start + tl.arange(0, CHUNK)
        offsets = rows[:, None] * D + channel[None, :]
        mask = (rows < L)[:, None] & valid[None, :]
        c = tl.load(c_ptr + offsets, mask=mask, other=0.0).to(ACC)
        # ``reverse=`` takes a bool: the compiler rejects REVERSE itself (an int), the interpreter did not.
        if KIND == DIAG:
            has_operator = (rows + REVERSE < L)[:, None] & valid[None, :]
            a = tl.load(A_ptr + offsets + REVERSE * D, mask=has_operator, other=1.0).to(ACC)
            a, b = tl.associative_scan((a, c), 0, _affine_combine, reverse=REVERSE == 1)
        else:
            a = 1.0
            b = tl.cumsum(c, 0, reverse=REVERSE == 1)
        if SUMMARY:
            edge = (rows == start + (1 - REVERSE) * (CHUNK - 1))[:, None]
            tl.store(out_ptr + k * D + channel, tl.sum(tl.where(edge, b, 0.0), axis=0), mask=valid)
            if KIND == DIAG:
                stored = _and_scalar(valid, channel, k + REVERSE < K)
                tl.store(P_ptr + (k + REVERSE) * D + channel, tl.sum(tl.where(edge, a, 0.0), axis=0),
                         mask=stored)
        else:
            tl.store(out_ptr + offsets, a * y[None, :] + b, mask=mask)

    @triton.jit
    def _chunk_kernel(A_ptr, c_ptr, h_ptr, out_ptr, P_ptr, L, K, D, V,
                      CHUNK: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr,
                      REVERSE: tl.constexpr, SUMMARY: tl.constexpr, USE_DOT: tl.constexpr,
                      ACC: tl.constexpr):
        """Run chunk ``k = program_id(1)`` (steps ``k C .. k C + C - 1``) of channel group
        ``v = program_id(0)``.

        ``c``, ``out`` and ``h`` rows hold ``D = N w`` channels; group ``v`` is channels
        ``v V .. v V + V - 1`` (full: ``V = w``, one batch element). Step ``l`` is
        ``y <- T_l y + c_l`` with ``T_l = A_l`` forward and ``A_{l+1}^T`` reverse.
        SUMMARY: start from zero; write the chunk's map ``(P, b)`` (the module docstring)
        as row ``k`` of ``out`` (``b``) and row ``k + REVERSE`` of ``P``. Otherwise: start
        from row ``k - 1`` (forward) or ``k + 1`` (reverse) of ``h``, zero outside
        ``0 .. K-1``, and write every ``y_l`` to ``out``.
        """
        v = tl.program_id(0)
        k = tl.program_id(1).to(tl.int64)
        lanes = tl.arange(0, BLOCK)
        channel = v * V + lanes
        valid = (lanes < V) & (channel < D)
        start = k * CHUNK
        if SUMMARY:
            y = tl.zeros((BLOCK,), ACC)
        else:
            source = k - 1 + 2 * REVERSE
            from_source = _and_scalar(valid, lanes, (source >= 0) & (source < K))
            y = tl.load(h_ptr + source * D + channel, mask=from_source, other=0.0).to(ACC)
        if KIND == FULL:
            _sequential_chunk(A_ptr, c_ptr, out_ptr, P_ptr, y, k, start, L, K, D, V, v, lanes, valid,
                              CHUNK, REVERSE, SUMMARY, USE_DOT, ACC)
        else:
            _scanned_chunk(A_ptr, c_ptr, out_ptr, P_ptr, y, k, start, L, K, D, channel, valid,
                           CHUNK, KIND, REVERSE, SUMMARY, ACC)
