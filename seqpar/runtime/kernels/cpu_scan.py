"""Forward substitution of the chain's linear systems on CPU, compiled from C at first use.

The systems are :mod:`seqpar.runtime.pcr`'s affine recurrences

    y_l = A_l y_{l-1} + c_l              (forward, y_{-1} = 0)
    y_l = A_{l+1}^T y_{l+1} + c_l        (reverse, y_L = 0)

with dense ``(L, N, w, w)`` or diagonal ``(L, N, w)`` blocks, and the
max-plus recurrence ``y_l = max(y_{l-1} + a_l, b_l)`` (:func:`maxplus`). On a CPU the
recursive-doubling and chunked scans of :mod:`~seqpar.runtime.pcr` are bound
by the cost of launching ~50 small torch operations per solve (0.9 ms at
``L = 4096, w = 4``), while substitution does ``L N w^2`` multiply-adds in one
pass (0.06-0.1 ms there, the call included): parallel depth buys nothing on a few
cores that the solve's few operations do not already have. The parallelism
of the Newton solve lies in evaluating ``f`` and its Jacobians at all
positions at once; the linear solve is exact either way (the two differ by
rounding only).

``cpu_scan.c`` is compiled at first use (:mod:`.c_build`: the system's C
compiler, a cache directory, :mod:`ctypes`). Without a compiler, or with
``SEQPAR_CPU_KERNEL=0``, :func:`available` is false and the solves use the
torch-op PCR; the reason is logged once.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch

from .c_build import BuildError, load

log = logging.getLogger("seqpar.runtime")

_SOURCE = Path(__file__).with_name("cpu_scan.c")
_C_TYPES = {torch.float32: "float", torch.float64: "double"}
_SCALARS = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}


def disabled_reason(dtype: torch.dtype = torch.float32) -> str | None:
    """Why the compiled kernel for ``dtype`` (float32 or float64) is not used (``None`` when it is)."""
    if os.environ.get("SEQPAR_CPU_KERNEL", "1") == "0":
        return "SEQPAR_CPU_KERNEL=0"
    return _library(dtype)[1]


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether CPU solves in ``dtype`` (float32 or float64) go to the compiled substitution kernel."""
    return disabled_reason(dtype) is None


def supports(A: torch.Tensor | None, c: torch.Tensor) -> bool:
    """Whether :func:`solve` takes these operands: plain CPU float32/float64 tensors, not under compilation."""
    tensors = (c,) if A is None else (A, c)
    return (
        all(type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == c.dtype for t in tensors)
        and c.dtype in _C_TYPES
        and not torch.compiler.is_compiling()
    )


def solve(A: torch.Tensor, c: torch.Tensor, kind: str, reverse: bool) -> torch.Tensor:
    """``y`` of the forward or reverse recurrence for ``kind`` ``"full"`` or ``"diag"``.

    ``c`` is ``(L, N, w)``; ``A`` as in :mod:`~seqpar.runtime.pcr` and of
    ``c``'s dtype (check :func:`supports` and :func:`available` first). The
    inputs are not modified.
    """
    library = _loaded(c.dtype)
    length, batch, width = c.shape
    y = c.clone(memory_format=torch.contiguous_format)
    A = A.contiguous()
    if kind == "full":
        library.scan_dense(A.data_ptr(), y.data_ptr(), length, batch, width, int(reverse))
    else:
        library.scan_diagonal(A.data_ptr(), y.data_ptr(), length, batch * width, int(reverse))
    return y


def maxplus(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y_l <- max(y_{l-1} + a_l, y_l)`` for ``l = 1..L-1``, in place on ``y`` (``(L, N, w)``, contiguous; ``a``
    of its shape and dtype): the max-plus recurrence of :mod:`seqpar.runtime.maxplus`. Returns ``y``. Check
    :func:`supports` and :func:`available` first."""
    library = _loaded(y.dtype)
    if not y.is_contiguous():
        raise ValueError("maxplus updates y in place: y must be contiguous")
    a = a.contiguous()
    library.scan_maxplus(a.data_ptr(), y.data_ptr(), y.shape[0], y[0].numel())
    return y


def newton_update(A: torch.Tensor, F: torch.Tensor, s: torch.Tensor, kind: str, atol: float, rtol: float):
    """One fused Newton update of the active states ``s`` (``(M, N, w)``, contiguous, updated in place).

    With ``c = F - s``: ``y_l = A_l y_{l-1} + c_l``, ``s_l <- s_l + y_l``, and
    ``s_0 <- F_0`` exactly (``kind`` ``"full"`` or ``"diag"``, ``A`` of ``s``'s
    dtype). The update is measured per state vector by ``max_k |y_k| / (atol + rtol
    max_k |s_new,k|)`` (``0 / 0`` counts as converged). Returns ``(first, largest, finite)``: the
    first position whose ratio is above 1 (``M`` when none), the largest ratio,
    and whether every ``y`` is finite (when not, ``s`` holds non-finite values:
    the caller discards them). Check :func:`supports` and :func:`available` first.
    """
    library = _loaded(s.dtype)
    if not s.is_contiguous():
        raise ValueError("newton_update updates s in place: s must be contiguous")
    length, batch, width = s.shape
    scalar = _SCALARS[s.dtype]
    largest, finite = scalar(), ctypes.c_int()
    A, F = A.contiguous(), F.contiguous()
    scratch = s.new_empty(2 * batch * width)  # y_{l-1} and y_l
    first = library.newton_update(
        A.data_ptr(), F.data_ptr(), s.data_ptr(), scratch.data_ptr(), length, batch, width, int(kind == "diag"),
        atol, rtol, ctypes.byref(largest), ctypes.byref(finite),
    )
    return first, largest.value, bool(finite.value)


def _loaded(dtype: torch.dtype) -> ctypes.CDLL:
    """The compiled kernel for ``dtype``; ``RuntimeError`` with the reason when it could not be built."""
    library, reason = _library(dtype)
    if library is None:
        raise RuntimeError(f"the CPU substitution kernel is unavailable: {reason}")
    return library


@functools.cache
def _library(dtype: torch.dtype) -> tuple[ctypes.CDLL | None, str | None]:
    """The compiled kernel for ``dtype`` and ``None``, or ``None`` and why it could not be built."""
    try:
        library = load(_SOURCE, _C_TYPES[dtype])
    except BuildError as error:
        reason = str(error)
        log.warning("seqpar: CPU substitution kernel unavailable (%s); linear solves use torch-op PCR", reason)
        return None, reason
    pointer, size = ctypes.c_void_p, ctypes.c_long
    library.scan_dense.argtypes = [pointer, pointer, size, size, size, ctypes.c_int]
    library.scan_diagonal.argtypes = [pointer, pointer, size, size, ctypes.c_int]
    library.scan_maxplus.argtypes = [pointer, pointer, size, size]
    library.scan_dense.restype = library.scan_diagonal.restype = library.scan_maxplus.restype = None
    scalar = _SCALARS[dtype]
    library.newton_update.argtypes = [
        pointer, pointer, pointer, pointer, size, size, size, ctypes.c_int, scalar, scalar,
        ctypes.POINTER(scalar), ctypes.POINTER(ctypes.c_int),
    ]
    library.newton_update.restype = size
    return library, None
