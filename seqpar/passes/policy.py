"""Parallel or sequential, per chain and per direction, and why.

The forward solve and the backward (adjoint) solve are decided separately: on
a CPU the parallel adjoint (one linear PCR solve) wins where the parallel
forward (several Newton iterations) loses. The cost model's thresholds come
from measurements on this project's 2-core CPU (ANCHORS.md, benchmarks/) and
from DeepPCR / DEER on GPUs; every decision carries a readable reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..options import Options
from .chain import Chain

# Widest state (values per batch element) for dense Jacobian blocks.
DENSE_WIDTH = 64
# CPU: the parallel forward pays off for small blocks on long chains only.
CPU_FORWARD_MAX_WORK = 4  # batch elements x state width
CPU_FORWARD_MIN_LENGTH = 1024
# CPU: the parallel adjoint pays off up to about 16 values per block row.
CPU_ADJOINT_MAX_WORK = 16
CPU_ADJOINT_MIN_LENGTH = 32
# GPU (DeepPCR, DEER): Newton + PCR wins up to w ~ 32 from L ~ 64.
GPU_MAX_WIDTH = 32
GPU_MIN_LENGTH = 64
ROLLED_FROM_LENGTH = 64


@dataclass
class Decision:
    """What the backend does with one chain.

    ``method``: "parallel" (Newton-type solve) or "sequential"; ``adjoint``:
    "parallel" or "sequential"; ``form``: "solver" (the chain op, Newton
    forward), "rolled" (the chain op, sequential loop forward) or "unrolled"
    (the chain left in the graph); ``jacobian``: the forward's blocks.
    """

    method: str
    adjoint: str
    form: str
    jacobian: str
    reason: str

    @property
    def label(self) -> str:
        """"parallel" when any direction is solved in parallel, else "sequential"."""
        return "parallel" if "parallel" in (self.method, self.adjoint) else "sequential"


def chain_geometry(chain: Chain) -> tuple[int, int]:
    """``(N, w)``: batch elements and state values per element."""
    batch = math.prod(chain.state_shape[: chain.batch_ndim])
    width = math.prod(chain.state_shape[chain.batch_ndim :])
    return batch, width


def decide(chain: Chain, options: Options, device_type: str, lyapunov: float | None) -> Decision:
    """Choose how ``chain`` runs; ``lyapunov`` is the probe's estimate (None: not probed)."""
    batch, width = chain_geometry(chain)
    length = chain.length
    jacobian = options.jacobian
    if jacobian == "auto":
        jacobian = "full" if width <= DENSE_WIDTH else "identity"
    dense_ok = width <= DENSE_WIDTH
    shape = f"L={length}, N={batch}, w={width}"

    if options.policy == "sequential":
        method, adjoint, why = "sequential", "sequential", "policy='sequential'"
    elif options.policy == "parallel":
        method = "parallel"
        adjoint = "parallel" if dense_ok else "sequential"
        why = "policy='parallel'" + ("" if dense_ok else f"; adjoint sequential: w={width} > {DENSE_WIDTH}")
    elif lyapunov is not None and lyapunov > 0:
        method, adjoint = "sequential", "sequential"
        why = f"unpredictable chain: largest Lyapunov exponent {lyapunov:.3g} > 0 (errors grow like exp(lambda L))"
    else:
        method, adjoint, why = _cost_model(device_type, batch, width, length, jacobian, chain.kind)
        why = f"{why} ({shape}, {device_type})"
        if lyapunov is not None:
            why += f"; Lyapunov exponent {lyapunov:.3g}"
    if options.adjoint != "auto" and options.policy != "sequential":
        if options.adjoint == "parallel" and not dense_ok:
            why += f"; adjoint='parallel' ignored: w={width} > {DENSE_WIDTH}"
        else:
            adjoint = options.adjoint
    if method == "parallel":
        form = "solver"
    elif adjoint == "parallel":
        form = "rolled"
    else:
        form = options.sequential_form
        if form == "auto":
            form = "rolled" if length >= ROLLED_FROM_LENGTH else "unrolled"
    return Decision(method=method, adjoint=adjoint, form=form, jacobian=jacobian, reason=why)


def _cost_model(device_type, batch, width, length, jacobian, kind):
    """(forward method, adjoint method, reason) from the measured crossover points."""
    dense_ok = width <= DENSE_WIDTH
    if device_type == "cuda":
        forward = dense_ok and width <= GPU_MAX_WIDTH and length >= GPU_MIN_LENGTH
        if not dense_ok and kind in ("residual", "denoise") and length >= GPU_MIN_LENGTH:
            forward = True  # Picard suits near-identity updates
        adjoint = dense_ok and width <= GPU_MAX_WIDTH
        reason = "GPU cost model"
    else:
        forward = dense_ok and batch * width <= CPU_FORWARD_MAX_WORK and length >= CPU_FORWARD_MIN_LENGTH
        adjoint = dense_ok and batch * width <= CPU_ADJOINT_MAX_WORK and length >= CPU_ADJOINT_MIN_LENGTH
        reason = (
            f"CPU cost model: parallel forward needs N*w <= {CPU_FORWARD_MAX_WORK} and L >= {CPU_FORWARD_MIN_LENGTH}, "
            f"parallel adjoint N*w <= {CPU_ADJOINT_MAX_WORK} and L >= {CPU_ADJOINT_MIN_LENGTH}"
        )
    if not dense_ok:
        reason += f"; w={width} > {DENSE_WIDTH}: no dense Jacobian blocks"
    return ("parallel" if forward else "sequential"), ("parallel" if adjoint else "sequential"), reason
