"""The sequential loop of a dense layer chain ``s_l = h(s_{l-1} W_l^T + b_l)`` as one compiled C call.

Eager PyTorch runs such a chain as two operator calls per step (``linear``,
then ``h``), a few microseconds each whatever the size: for the small states
of a chain kept sequential for cost (a dozen to a few hundred values) that
fixed cost is most of the step. ``cpu_dense_loop.c`` runs all ``L`` steps in
one call, ``N w^2`` multiply-adds and ``N w`` activations per step, the dot
products accumulated in double and the activation evaluated in double on the
rounded pre-activation. Its states differ from eager's by rounding (about a
unit in the last place per step: another summation order, other activation
formulas than ATen's vectorised ones), so it is only for chains whose errors
do not grow (the policy's cost-model
decisions on a chain the probe found contractive); a chain kept sequential
because it is unpredictable, a fallback and a reference run eager's kernels
(:mod:`seqpar.runtime.rolled`).

Compiled at first use (:mod:`.c_build`); ``SEQPAR_CPU_KERNEL=0`` or a missing
compiler disables it, as for :mod:`.cpu_scan`.
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

_SOURCE = Path(__file__).with_name("cpu_dense_loop.c")
_C_TYPES = {torch.float32: "float", torch.float64: "double"}
# h by name, as cpu_dense_loop.c numbers them.
ACTIVATIONS = {"identity": 0, "relu": 1, "tanh": 2, "sigmoid": 3, "silu": 4, "gelu": 5, "gelu_tanh": 6}
# Steps larger than this many multiply-adds per step run faster as eager's BLAS call than as the plain C loop.
MAX_STEP_MACS = 4096


def available(dtype: torch.dtype) -> bool:
    """Whether the compiled loop for ``dtype`` can run here (built, or buildable, and not disabled)."""
    if dtype not in _C_TYPES or os.environ.get("SEQPAR_CPU_KERNEL", "1") == "0":
        return False
    return _library(dtype) is not None


def worthwhile(batch: int, width: int) -> bool:
    """Whether a step of ``batch`` rows of ``width`` values is small enough for the C loop to beat eager's calls."""
    return batch * width * width <= MAX_STEP_MACS


def run(s0: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
        weight_layout: int, activation: str) -> torch.Tensor | None:
    """``out[l] = h(out[l-1] W_l^T + b_l)`` (``weight_layout`` 1: ``W_l`` as ``linear`` takes it) or
    ``h(out[l-1] W_l + b_l)`` (``weight_layout`` 0), ``out[-1] = s0``, ``l = 0 .. L-1``.

    ``s0`` ``(N, w)``; ``weight`` ``(L, w, w)``, or ``(w, w)`` for one ``W`` in
    every step; ``bias`` ``(L, w)``, ``(w,)`` or ``None``; ``out`` ``(L, N, w)``.
    Returns ``out``, or ``None`` (nothing written) where a tensor is not a
    contiguous CPU tensor of ``s0``'s dtype and of these sizes (or memory ran
    out): the caller then runs eager's loop.
    """
    length, (batch, width) = out.shape[0], s0.shape
    expected = [(s0, (batch, width)), (out, (length, batch, width)), (weight, (length, width, width), (width, width))]
    if bias is not None:
        expected.append((bias, (length, width), (width,)))
    if not all(_fits(tensor, s0.dtype, shapes) for tensor, *shapes in expected):
        return None
    status = _library(s0.dtype).dense_loop(
        s0.data_ptr(), weight.data_ptr(), width * width if weight.dim() == 3 else 0,
        None if bias is None else bias.data_ptr(), 0 if bias is None or bias.dim() == 1 else width,
        out.data_ptr(), length, batch, width, weight_layout, ACTIVATIONS[activation],
    )
    return out if status == 0 else None


def _fits(tensor: torch.Tensor, dtype: torch.dtype, shapes) -> bool:
    return (type(tensor) is torch.Tensor and tensor.dtype == dtype and tuple(tensor.shape) in shapes
            and tensor.is_contiguous() and tensor.device.type == "cpu")


@functools.cache
def _library(dtype: torch.dtype) -> ctypes.CDLL | None:
    try:
        library = load(_SOURCE, _C_TYPES[dtype])
    except BuildError as error:
        log.warning("seqpar: the compiled CPU loop is unavailable (%s); layer chains kept sequential run "
                    "eager's kernels", error)
        return None
    pointer, size, flag = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    library.dense_loop.argtypes = [pointer, pointer, size, pointer, size, pointer, size, size, size, flag, flag]
    library.dense_loop.restype = ctypes.c_int
    return library
