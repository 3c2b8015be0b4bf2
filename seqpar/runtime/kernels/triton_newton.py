"""A fused Newton step for chains of affine maps followed by a pointwise activation.

For the step family

    s_l = f(s_{l-1}, x_l) = g(W_l s_{l-1} + b_l),    l = 0 .. L-1,

with ``W`` of shape ``(L, w, w)`` (or one ``(w, w)`` shared by every step),
``b`` of shape ``(L, w)`` or ``(L, N, w)`` (a per-batch bias, e.g. a
precomputed input projection ``U x_l + b``), states of shape ``(N, w)`` and
``g`` one of :data:`ACTIVATIONS`, one Newton iteration at the iterate ``S``
``(L, N, w)`` with initial state ``s0`` ``(N, w)`` is

    prev_l = S_{l-1}  (prev_0 = s0),       z_l = W_l prev_l + b_l,
    F_l = g(z_l),                          c_l = F_l - S_l,
    J_l = diag(g'(z_l)) W_l               (``"full"``: Newton),
    J_l = diag(g'(z_l) * diag(W_l))       (``"diag"``: quasi-Newton),
    ds_l = J_l ds_{l-1} + c_l,             ds_{-1} = 0,

all per batch element ``n``; the new iterate is ``S + ds``. This is the system
:mod:`seqpar.runtime.newton` builds from ``steps_and_jacobians`` and hands to
:func:`seqpar.runtime.pcr.solve_affine_recurrence`; here it is one fused
solve, ParaRNN's fused mode.

Why and when it pays: the unfused step materialises ``J`` (``L N w^2``
values: written by the Jacobian computation, read by the solve, read again by
each recursion level) and ``F`` (``L N w``) before solving. The fused kernels
read ``W`` (``L w^2``, or ``w^2`` when shared) and compute ``z``, ``g``, ``g'``
and ``J`` in registers: the memory traffic of an iteration drops from about
``L N w^2 (reads + writes)`` to ``2 L w^2 + O(L N w)`` (``W`` is read twice,
by the two passes below). It pays when ``N w^2`` Jacobian entries per step
dominate, i.e. for dense Jacobians with ``w`` beyond a few and for batches;
for ``w = 1..2`` and tiny ``N`` the unfused path moves little data anyway.
On this project's CPU-only machine the kernels have only been run by the
Triton interpreter (``TRITON_INTERPRET=1``): correct, but not timed on a GPU.

The solve reuses the chunked scheme of :mod:`seqpar.runtime.kernels.triton_pcr`:

1. every chunk of ``C`` steps of one batch element computes, from a zero
   incoming ``ds``, its affine map ``(P_k, e_k)`` with ``P_k = J_{end-1} ..
   J_{start}`` (a ``w x w`` tile, or a ``w`` vector for ``"diag"``), computing
   each ``J_l`` and ``c_l`` on the fly from ``W_l``, ``b_l``, ``S_{l-1}``, ``S_l``;
2. the ``K = ceil(L / C)`` chunk maps are a recurrence of the same kind, solved
   by :func:`seqpar.runtime.kernels.triton_pcr.solve_chunked` (its ``P`` and ``e`` are
   ``K / L`` of the chain, in the accumulation dtype);
3. every chunk runs again from its true incoming ``ds``, recomputing ``J_l`` and
   ``c_l``, and writes ``ds`` (and ``F`` if asked).

Only ``w <=`` :data:`MAX_WIDTH` (one ``w x w`` tile per program in registers).
Arithmetic is float32 for half and bfloat16 inputs (float64 if any input is
float64); ``ds`` and ``F`` have ``S``'s dtype.
"""

from __future__ import annotations

import torch

from . import triton_pcr
from ..spec import accumulation_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

ACTIVATIONS = ("identity", "tanh", "sigmoid", "relu", "silu", "gelu")
"""Pointwise ``g``; ``"gelu"`` is the tanh approximation ``0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))``."""
JACOBIANS = ("full", "diag")
MAX_WIDTH = 32
DEFAULT_CHUNK = 32
"""Steps per chunk (a power of two)."""

_ACTIVATION_CODE = {name: code for code, name in enumerate(ACTIVATIONS)}


def available() -> bool:
    """True iff Triton imports and can run here: a CUDA device, or ``TRITON_INTERPRET=1``."""
    return triton_pcr.available()


def fused_newton_update(
    W: torch.Tensor,
    b: torch.Tensor,
    s0: torch.Tensor,
    S: torch.Tensor,
    activation: str,
    *,
    jacobian: str = "full",
    chunk: int | None = None,
    return_values: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Newton update ``ds`` ``(L, N, w)`` of the module docstring at the iterate ``S``.

    ``W``: ``(L, w, w)`` or ``(w, w)``; ``b``: ``(L, w)`` or ``(L, N, w)``;
    ``s0``: ``(N, w)``; ``S``: ``(L, N, w)``, the current iterate of the ``L`` states
    after ``s0``. The new iterate is ``S + ds``.
    ``jacobian``: ``"full"`` (``J_l = diag(g'(z_l)) W_l``, Newton) or ``"diag"``
    (its diagonal, quasi-Newton). ``chunk``: steps per chunk, a power of two
    (default :data:`DEFAULT_CHUNK`). With ``return_values`` also ``F`` ``(L, N, w)``,
    ``F_l = g(W_l prev_l + b_l)``, as ``(ds, F)``.

    A Newton solve on a suffix starting at position ``t`` passes ``W[t:]``,
    ``b[t:]``, ``S[t-1]`` as ``s0`` and ``S[t:]``. Runs through the op
    ``seqpar::fused_newton_update``.
    """
    _check(W, b, s0, S, activation, jacobian, chunk)
    ds, F = fused_newton_update_op(W, b, s0, S, activation, jacobian, chunk, return_values)
    return (ds, F) if return_values else ds


def _check(W, b, s0, S, activation, jacobian, chunk):
    """Shapes, names and ``chunk``, with errors that say what was expected."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if jacobian not in JACOBIANS:
        raise ValueError(f"jacobian must be one of {JACOBIANS}, got {jacobian!r}")
    if chunk is not None and (chunk < 1 or chunk & (chunk - 1)):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    if S.dim() != 3:
        raise ValueError(f"S must have shape (L, N, w), got {tuple(S.shape)}")
    length, batch, width = S.shape
    if width > MAX_WIDTH:
        raise ValueError(f"fused Newton kernels hold one w x w tile in registers: w <= {MAX_WIDTH}, got {width}")
    problems = []
    if tuple(s0.shape) != (batch, width):
        problems.append(f"s0 of shape {(batch, width)}, got {tuple(s0.shape)}")
    if tuple(W.shape) not in ((length, width, width), (width, width)):
        problems.append(f"W of shape {(length, width, width)} or {(width, width)}, got {tuple(W.shape)}")
    if tuple(b.shape) not in ((length, width), (length, batch, width)):
        problems.append(f"b of shape {(length, width)} or {(length, batch, width)}, got {tuple(b.shape)}")
    if problems:
        raise ValueError(f"S of shape {tuple(S.shape)} needs " + "; ".join(problems))


def _values_shape(S, with_values):
    return S.shape if with_values else (0, *S.shape[1:])


@torch.library.custom_op("seqpar::fused_newton_update", mutates_args=())
def fused_newton_update_op(
    W: torch.Tensor,
    b: torch.Tensor,
    s0: torch.Tensor,
    S: torch.Tensor,
    activation: str,
    jacobian: str,
    chunk: int | None,
    with_values: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ds, F)``; ``F`` has no rows unless ``with_values``. See :func:`fused_newton_update`."""
    ds = torch.empty(S.shape, dtype=S.dtype, device=S.device)
    F = torch.empty(_values_shape(S, with_values), dtype=S.dtype, device=S.device)
    if S.numel() == 0:
        return ds, F
    _solve(W.contiguous(), b.contiguous(), s0.contiguous(), S.contiguous(), ds, F if with_values else None,
           activation, jacobian, chunk or DEFAULT_CHUNK)
    return ds, F


@fused_newton_update_op.register_fake
def _fused_newton_update_fake(W, b, s0, S, activation, jacobian, chunk, with_values):
    ds = torch.empty(S.shape, dtype=S.dtype, device=S.device)
    return ds, torch.empty(_values_shape(S, with_values), dtype=S.dtype, device=S.device)


def _accumulation(*tensors):
    """float64 if any input is float64, else float32 (half and bfloat16 accumulate in float32)."""
    dtypes = {accumulation_dtype(t.dtype) for t in tensors}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _solve(W, b, s0, S, ds, F, activation, jacobian, chunk):
    """The three phases of the module docstring; writes ``ds`` (and ``F``) in place."""
    length, batch, width = S.shape
    work = _accumulation(W, b, s0, S)
    chunks = triton.cdiv(length, chunk)
    if chunks == 1:
        _launch(W, b, s0, S, None, ds, F, None, activation, jacobian, chunk, work, summary=False)
        return
    ends = torch.empty((chunks, batch, width), dtype=work, device=S.device)
    maps_shape = (chunks, batch, width, width) if jacobian == "full" else (chunks, batch, width)
    maps = torch.empty(maps_shape, dtype=work, device=S.device)
    _launch(W, b, s0, S, None, ends, None, maps, activation, jacobian, chunk, work, summary=True)
    # ends[k] = P_k ends[k-1] + e_k: the same recurrence, K long; afterwards ds at each chunk's end.
    boundary = triton_pcr.solve_chunked(maps, ends, jacobian, False, chunk)
    _launch(W, b, s0, S, boundary, ds, F, None, activation, jacobian, chunk, work, summary=False)


def _launch(W, b, s0, S, incoming, out, values, maps, activation, jacobian, chunk, work, *, summary):
    """One pass of :func:`_newton_chunk_kernel`, one program per (batch element, chunk); unused
    pointers get ``S``."""
    length, batch, width = S.shape
    block = max(2, triton.next_power_of_2(width))
    grid = (batch, triton.cdiv(length, chunk))
    _newton_chunk_kernel[grid](
        W,
        b,
        s0,
        S,
        S if incoming is None else incoming,
        out,
        S if values is None else values,
        S if maps is None else maps,
        length,
        grid[1],
        width,
        W.stride(0) if W.dim() == 3 else 0,
        b.stride(0),
        b.stride(1) if b.dim() == 3 else 0,
        CHUNK=chunk,
        BLOCK=block,
        ACTIVATION=_ACTIVATION_CODE[activation],
        DIAGONAL=jacobian == "diag",
        SUMMARY=summary,
        WRITE_VALUES=values is not None,
        USE_DOT=jacobian == "full" and block >= 16 and work == torch.float32,
        ACC=tl.float64 if work == torch.float64 else tl.float32,
        num_warps=max(1, min(4, block * block // 256)),
    )


if triton is not None:
    TANH: tl.constexpr = tl.constexpr(_ACTIVATION_CODE["tanh"])
    SIGMOID: tl.constexpr = tl.constexpr(_ACTIVATION_CODE["sigmoid"])
    RELU: tl.constexpr = tl.constexpr(_ACTIVATION_CODE["relu"])
    SILU: tl.constexpr = tl.constexpr(_ACTIVATION_CODE["silu"])
    GELU: tl.constexpr = tl.constexpr(_ACTIVATION_CODE["gelu"])

    @triton.jit
    def _activation(z, ACTIVATION: tl.constexpr):
        """``(g(z), g'(z))`` elementwise.

        ``tanh u = sign(u) (1 - e^{-2|u|}) / (1 + e^{-2|u|})`` and ``sigmoid z = 1 / (1 + e^{-z})``
        do not overflow. Written without calls to other jit functions: the Triton
        interpreter pays milliseconds for each call, once per step.
        """
        if ACTIVATION == TANH:
            t = tl.exp(-2.0 * tl.abs(z))
            g = tl.where(z < 0, t - 1.0, 1.0 - t) / (1.0 + t)
            dg = 1.0 - g * g
        elif ACTIVATION == SIGMOID:
            g = 1.0 / (1.0 + tl.exp(-z))
            dg = g * (1.0 - g)
        elif ACTIVATION == RELU:
            positive = z > 0
            g = tl.where(positive, z, 0.0)
            dg = tl.where(positive, 1.0, 0.0)
        elif ACTIVATION == SILU:
            s = 1.0 / (1.0 + tl.exp(-z))
            g = z * s
            dg = s * (1.0 + z * (1.0 - s))
        elif ACTIVATION == GELU:
            # g = z (1 + tanh u) / 2 with u = sqrt(2 / pi) (z + 0.044715 z^3)
            u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
            e = tl.exp(-2.0 * tl.abs(u))
            t = tl.where(u < 0, e - 1.0, 1.0 - e) / (1.0 + e)
            g = 0.5 * z * (1.0 + t)
            dg = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
        else:
            g = z
            dg = z * 0.0 + 1.0
        return g, dg

    @triton.jit
    def _newton_chunk_kernel(W_ptr, b_ptr, s0_ptr, S_ptr, h_ptr, out_ptr, F_ptr, P_ptr,
                             L, K, V, w_stride, b_stride, b_batch_stride,
                             CHUNK: tl.constexpr, BLOCK: tl.constexpr, ACTIVATION: tl.constexpr,
                             DIAGONAL: tl.constexpr, SUMMARY: tl.constexpr, WRITE_VALUES: tl.constexpr,
                             USE_DOT: tl.constexpr, ACC: tl.constexpr):
        """Chunk ``k = program_id(1)`` (steps ``k C .. k C + C - 1``) of batch element ``n = program_id(0)``.

        Step ``l``: ``z = W_l prev + b_l`` (``prev = S_{l-1}``, ``s0`` at ``l = 0``),
        ``(g, g') = activation(z)``, ``c = g - S_l``, ``T = g'[:, None] W_l`` (DIAGONAL:
        ``g' diag(W_l)``), ``y <- T y + c``. ``S``, ``out``, ``h`` rows hold ``N w``
        values, ``V = w``. SUMMARY: ``y`` starts at zero, the chunk's map is composed
        (``P <- T P``) and ``(P, y)`` written as row ``k`` of ``P`` and ``out``. Otherwise
        ``y`` starts from row ``k - 1`` of ``h`` (zero for ``k = 0``) and every ``y_l``
        (and ``g`` if WRITE_VALUES) is written.
        """
        n = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1).to(tl.int64)
        D = tl.num_programs(0) * V
        lanes = tl.arange(0, BLOCK)
        valid = lanes < V
        tile = valid[:, None] & valid[None, :]
        rows = lanes[:, None] * V + lanes[None, :]
        start = k * CHUNK
        steps = tl.minimum(start + CHUNK, L) - start
        state = n * V + lanes
        if start == 0:
            prev = tl.load(s0_ptr + state, mask=valid, other=0.0).to(ACC)
        else:
            prev = tl.load(S_ptr + (start - 1) * D + state, mask=valid, other=0.0).to(ACC)
        if SUMMARY:
            y = tl.zeros((BLOCK,), ACC)
        else:
            # k > 0 as a lane comparison: the interpreter gives splatted booleans an integer dtype.
            from_source = valid & (lanes * 0 + k > 0)
            y = tl.load(h_ptr + (k - 1) * D + state, mask=from_source, other=0.0).to(ACC)
        if DIAGONAL:
            P = tl.where(valid, 1.0, 0.0).to(ACC)
        else:
            P = (lanes[:, None] == lanes[None, :]).to(ACC)
        for i in range(steps):
            l = start + i
            W = tl.load(W_ptr + l * w_stride + rows, mask=tile, other=0.0).to(ACC)
            bias = tl.load(b_ptr + l * b_stride + n * b_batch_stride + lanes, mask=valid, other=0.0).to(ACC)
            current = tl.load(S_ptr + l * D + state, mask=valid, other=0.0).to(ACC)
            z = tl.sum(W * prev[None, :], axis=1) + bias
            g, dg = _activation(z, ACTIVATION)
            c = tl.where(valid, g - current, 0.0)
            if DIAGONAL:
                a = dg * tl.sum(tl.where(lanes[:, None] == lanes[None, :], W, 0.0), axis=1)
                y = a * y + c
                if SUMMARY:
                    P = a * P
            else:
                T = dg[:, None] * W
                y = tl.sum(T * y[None, :], axis=1) + c
                if SUMMARY and USE_DOT:
                    P = tl.dot(T, P, input_precision="ieee")
                elif SUMMARY:
                    P = tl.sum(T[:, :, None] * P[None, :, :], axis=1)
            if not SUMMARY:
                tl.store(out_ptr + l * D + state, y, mask=valid)
                if WRITE_VALUES:
                    tl.store(F_ptr + l * D + state, g, mask=valid)
            prev = current
        if SUMMARY:
            tl.store(out_ptr + k * D + state, y, mask=valid)
            if DIAGONAL:
                tl.store(P_ptr + k * D + state, P, mask=valid)
            else:
                tl.store(P_ptr + k * D * V + n * V * V + rows, P, mask=tile)
