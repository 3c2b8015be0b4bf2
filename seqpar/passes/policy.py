"""Parallel or sequential, per chain and per direction, and why.

The forward solve and the backward (adjoint) solve are decided separately: on
a CPU the parallel adjoint (one linear PCR solve) wins where the parallel
forward (several Newton iterations) loses. The step's Jacobian structure,
proven from its traced graph (:mod:`seqpar.runtime.structure`), moves the
lines: a diagonal step has blocks of ``w`` values, not ``w^2``, at any width,
and an affine one is solved by one linear solve, not several iterations. The cost model's thresholds come
from measurements on this project's 2-core CPU (ANCHORS.md, benchmarks/) and
from DeepPCR / DEER on GPUs; every decision carries a readable reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from ..runtime.spec import DENSE_WIDTH, resolve_jacobian
from ..runtime.structure import StepStructure
from .chain import Chain

class PassOptions(Protocol):
    """What the passes read of the backend's options (:class:`seqpar.options.Options` has these fields and
    more; the passes do not import the entry above them)."""

    policy: str
    jacobian: str
    adjoint: str
    window: int | str | None
    sequential_form: str
    tol: float | None
    max_iters: int | None
    min_chain: int
    inner: str


# CPU crossovers, measured on the MLP grid with the compiled CPU kernel (benchmarks/RESULTS.md,
# "MLP grid, session 3"): the parallel forward wins from L = 1024 on up to N*w = 16 (1.2-16x;
# 1.2x only at N*w = 16, so the rule stops at 8) and loses at N*w = 32 and at L <= 256; the
# parallel adjoint wins from L = 64 on up to N*w = 256 (1.6-300x) and breaks even at 512.
CPU_FORWARD_MAX_WORK = 8  # batch elements x state width
CPU_FORWARD_MIN_LENGTH = 1024
CPU_ADJOINT_MAX_WORK = 256
# A dense adjoint's PCR multiplies w x w blocks (N w^3 per position and level) where the sequential VJPs multiply
# vectors by them (N w^2): on recurrent cells with one weight matrix for every step (GRU, Elman; benchmarks/
# RESULTS.md, "The dense adjoint in runs") the parallel adjoint, in runs, wins 1.1-4.8x over the sequential one
# up to N w^2 = 8192 block values per position and loses from 16384 (a GRU at N = 4, w = 64: 0.91-0.94x).
CPU_ADJOINT_MAX_BLOCK = 8192
CPU_ADJOINT_MIN_LENGTH = 32
# Diagonal steps (benchmarks/RESULTS.md, "Structure", measured through the backend against the rolled loop):
# a diagonal affine chain, one linear solve, wins its forward from L = 64 on up to N*w = CPU_LINEAR_FORWARD_MAX_WORK;
# the diagonal adjoint (taken in runs of 1 MiB of blocks, benchmarks/RESULTS.md "The diagonal adjoint in runs")
# wins 1.4-3.7x over the sequential VJPs up to N*w = CPU_DIAGONAL_ADJOINT_MAX_WORK, ties at 8192, loses at
# 65536. A max-plus chain (one pass of the same cost, seqpar.runtime.maxplus) takes the diagonal affine line. A
# diagonal nonlinear step still takes Newton iterations (about 20 on a long chain from the initial state): the
# dense forward's line holds for it.
CPU_LINEAR_FORWARD_MAX_WORK = 1024
CPU_LINEAR_FORWARD_MIN_LENGTH = 64
CPU_DIAGONAL_ADJOINT_MAX_WORK = 4096
# GPU (DeepPCR, DEER): Newton + PCR wins up to w ~ 32 from L ~ 64.
GPU_MAX_WIDTH = 32
GPU_MIN_LENGTH = 64
ROLLED_FROM_LENGTH = 64
# Denoising chains: sliding-window Picard (ParaDiGMS); see _denoise_solver.
DENOISE_WINDOW = 32
# Denoising chains: Picard (A = I) or the Jacobian estimate (A = c_l I from one VJP per
# position, made at the position's first evaluation and reused: jacobian="estimate"); see
# _denoise_jacobian. Measured on the MLP denoiser and a tiny UNet, DDIM / DDPM / Euler
# ancestral, T = 50 and 250, W = 8..64 (benchmarks/RESULTS.md, "Denoising: Picard vs
# JVP-estimated quasi-Newton", session 3): an estimate evaluation (forward + VJP) costs
# ESTIMATE_COST forward evaluations (about 1.8 to 2.2 where the machine was quiet), paid once
# per position, so a solve costs iterations x W + (ESTIMATE_COST - 1) x L evaluation-equivalents;
# the estimate divides Picard's iterations by a factor that grows with W |lambda| (the window
# times the Lyapunov exponent, for these steps the mean log c_l): 1.0 at 0, 1.2-1.35 at
# 0.16-0.33 (break-even at 0.32-0.33), 1.4-1.5 at 0.65-0.8 (1.06-1.16x fewer
# evaluation-equivalents), 1.5-1.7 at 1.3-1.6 (1.3-1.4x), 1.8-2.05 at 2.6-3.2 (1.56-1.72x),
# 2.9 at 6.5 (2.5x). Before the estimate was cached (re-made every iteration) it broke even
# at about 3.
ESTIMATE_COST = 2.0
ESTIMATE_MIN_SPREAD = 0.5


@dataclass
class Decision:
    """What the backend does with one chain.

    ``method``: "parallel" (Newton-type solve) or "sequential"; ``adjoint``:
    "parallel" or "sequential"; ``form``: "solver" (the chain op, Newton
    forward), "rolled" (the chain op, sequential loop forward) or "unrolled"
    (the chain left in the graph); ``jacobian``: the forward's blocks;
    ``loop``: how a sequential forward may run: ``"exact"`` (eager's kernels in
    eager's order, bit for bit) or ``"compiled"`` (a small dense step may run
    as one compiled C loop, rounding differently: only for a chain the probe
    found contractive, kept sequential for cost, whose errors do not grow), or
    ``"fused"`` (such a chain may also run its step compiled by inductor, its
    inputs' producers taken in: :func:`~.pipeline.fuse_producers`).
    """

    method: str
    adjoint: str
    form: str
    jacobian: str
    reason: str
    window: int | None = None
    loop: str = "exact"

    @property
    def label(self) -> str:
        """"parallel" when any direction is solved in parallel, else "sequential"."""
        return "parallel" if "parallel" in (self.method, self.adjoint) else "sequential"


def chain_geometry(chain: Chain) -> tuple[int, int]:
    """``(N, w)``: batch elements and state values per element (summed over a tuple state's tensors)."""
    shapes = chain.leaf_shapes
    batch = math.prod(shapes[0][: chain.batch_ndim])
    width = sum(math.prod(shape[chain.batch_ndim :]) for shape in shapes)
    return batch, width


def needs_structure(chain: Chain, options: PassOptions, lyapunov: float | None) -> bool:
    """Whether the step's Jacobian structure can change :func:`decide`'s answer (worth lowering the step for):
    not for ``policy="sequential"``, an unpredictable chain, or a denoising loop (a denoiser mixes its state)."""
    unpredictable = options.policy == "auto" and lyapunov is not None and lyapunov > 0
    return options.policy != "sequential" and not unpredictable and chain.kind != "denoise"


def never_rewritten(chain: Chain, options: PassOptions, device_type: str) -> bool:
    """Whether :func:`decide` leaves ``chain`` in the graph as it is (sequential, form "unrolled") at every batch
    and state size, whatever the probe and the step's structure: a chain of the unrolled loop, not a denoising one,
    shorter than every length from which it is rolled (``ROLLED_FROM_LENGTH``) or a direction it runs is solved in
    parallel: its forward (a CPU's ``CPU_LINEAR_FORWARD_MIN_LENGTH``, ``CPU_FORWARD_MIN_LENGTH``; a GPU's
    ``GPU_MIN_LENGTH``) and, where autograd records the chain, its adjoint (a CPU's ``CPU_ADJOINT_MIN_LENGTH``; on
    a GPU from any length where the blocks fit, which depends on the sizes: never claimed there); or any length
    under ``policy="sequential"`` with the form "unrolled"."""
    if options.policy == "parallel" or chain.kind == "denoise" or chain.origin == "scan":
        return False
    form = options.sequential_form
    if form == "rolled" or (form == "auto" and chain.length >= ROLLED_FROM_LENGTH):
        return False
    if options.policy == "sequential":
        return True
    cuda = device_type == "cuda"
    shortest = GPU_MIN_LENGTH if cuda else min(CPU_LINEAR_FORWARD_MIN_LENGTH, CPU_FORWARD_MIN_LENGTH)
    if chain.records_autograd:
        if cuda or options.adjoint == "parallel":
            return False
        shortest = min(shortest, CPU_ADJOINT_MIN_LENGTH)
    return chain.length < shortest


def decide(
    chain: Chain, options: PassOptions, device_type: str, lyapunov: float | None, structure: StepStructure | None = None
) -> Decision:
    """Choose how ``chain`` runs; ``lyapunov`` is the probe's estimate (None: not probed); ``structure`` the
    step's Jacobian structure proven from its traced graph (None: not known, the step is taken as dense)."""
    batch, width = chain_geometry(chain)
    diagonal = structure is not None and structure.diagonal
    length = chain.length
    jacobian = options.jacobian
    window = options.window
    if window == "auto":
        window = DENOISE_WINDOW if chain.kind == "denoise" and jacobian in ("auto", "identity", "estimate") else None
    if window is not None and window >= length:
        window = None
    choice = f"jacobian={jacobian!r} was asked for"
    loop = "exact"
    if jacobian == "auto" and chain.kind == "denoise":
        jacobian, choice = _denoise_jacobian(lyapunov, length if window is None else window)
    else:
        jacobian = resolve_jacobian(jacobian, width, diagonal)
    blocks_ok = width <= DENSE_WIDTH or diagonal  # Jacobian blocks affordable: dense ones only up to DENSE_WIDTH
    shape = f"L={length}, N={batch}, w={width}"

    if options.policy == "sequential":
        method, adjoint, why = "sequential", "sequential", "policy='sequential'"
    elif options.policy == "parallel":
        method = "parallel"
        adjoint = "parallel" if blocks_ok and chain.kind != "denoise" else "sequential"
        why = "policy='parallel'"
        if not blocks_ok:
            why += f"; adjoint sequential: w={width} > {DENSE_WIDTH}"
        elif chain.kind == "denoise":
            why += "; adjoint sequential: a denoising step's dense Jacobian costs w VJPs, the sequential adjoint one"
    elif lyapunov is not None and lyapunov > 0:
        method, adjoint = "sequential", "sequential"
        why = f"unpredictable chain: largest Lyapunov exponent {lyapunov:.3g} > 0 (errors grow like exp(lambda L))"
    else:
        method, adjoint, why = _cost_model(device_type, batch, width, length, jacobian, chain.kind, structure)
        why = f"{why} ({shape}, {device_type})"
        if lyapunov == float("-inf"):
            why += "; Lyapunov exponent -inf (the probed Jacobian products vanish: the state is forgotten)"
        elif lyapunov is not None:
            why += f"; Lyapunov exponent {lyapunov:.3g}"
        if lyapunov is not None and lyapunov < 0:
            loop = "compiled"
    if options.adjoint != "auto" and options.policy != "sequential":
        if options.adjoint == "parallel" and not blocks_ok:
            why += f"; adjoint='parallel' ignored: w={width} > {DENSE_WIDTH}"
        else:
            adjoint = options.adjoint
    if adjoint == "parallel" and not chain.records_autograd:
        adjoint = "sequential"
        why += "; no adjoint: autograd records nothing through this chain (no backward runs)"
    if method == "parallel":
        form = "solver"
    elif adjoint == "parallel":
        form = "rolled"
    else:
        form = options.sequential_form
        if form == "auto":
            # A scan kept sequential runs in the op's loop at any length: inductor (torch 2.13) rejects
            # many scans (an empty or carry-aliasing per-step output, its loop lowering without fullgraph).
            form = "rolled" if length >= ROLLED_FROM_LENGTH or chain.origin == "scan" else "unrolled"
    if method == "parallel" and chain.kind == "denoise":
        why += f"; {_denoise_solver(jacobian, window, choice)}"
    if structure is not None and (structure.diagonal or structure.affine):
        why += f"; {_structure_text(structure, jacobian)}"
    return Decision(method=method, adjoint=adjoint, form=form, jacobian=jacobian, reason=why,
                    window=window if method == "parallel" else None, loop=loop)


def _cost_model(device_type, batch, width, length, jacobian, kind, structure=None):
    """(forward method, adjoint method, reason) from the measured crossover points; a diagonal step (``structure``)
    has diagonal blocks at any width, a diagonal affine one is one linear solve (its own CPU line)."""
    diagonal = structure is not None and structure.diagonal
    blocks_ok = width <= DENSE_WIDTH or diagonal
    if kind == "denoise":
        return _denoise_cost_model(device_type, batch, width, length)
    if device_type == "cuda":
        narrow = width <= GPU_MAX_WIDTH or diagonal
        forward = blocks_ok and narrow and length >= GPU_MIN_LENGTH
        if not blocks_ok and kind == "residual" and length >= GPU_MIN_LENGTH:
            forward = True  # Picard suits near-identity updates
        adjoint = blocks_ok and narrow
        reason = (f"GPU cost model (DeepPCR/DEER's published crossovers, w <= {GPU_MAX_WIDTH} (any w for a diagonal "
                  f"step) from L = {GPU_MIN_LENGTH}: not yet measured on hardware)")
    else:
        linear = diagonal and (structure.affine or structure.maxplus) and jacobian == "full"
        forward_work, forward_length = (
            (CPU_LINEAR_FORWARD_MAX_WORK, CPU_LINEAR_FORWARD_MIN_LENGTH)
            if linear
            else (CPU_FORWARD_MAX_WORK, CPU_FORWARD_MIN_LENGTH)
        )
        adjoint_work = CPU_DIAGONAL_ADJOINT_MAX_WORK if diagonal else CPU_ADJOINT_MAX_WORK
        forward = blocks_ok and batch * width <= forward_work and length >= forward_length
        small_blocks = diagonal or batch * width**2 <= CPU_ADJOINT_MAX_BLOCK
        adjoint = blocks_ok and small_blocks and batch * width <= adjoint_work and length >= CPU_ADJOINT_MIN_LENGTH
        step = f" ({structure.label} step)" if linear else " (diagonal step)" if diagonal else ""
        reason = (
            f"CPU cost model{step}: parallel forward needs N*w <= {forward_work} and L >= {forward_length}, "
            f"parallel adjoint N*w <= {adjoint_work}{'' if diagonal else f', N*w^2 <= {CPU_ADJOINT_MAX_BLOCK}'} "
            f"and L >= {CPU_ADJOINT_MIN_LENGTH}"
        )
    if not blocks_ok:
        reason += f"; w={width} > {DENSE_WIDTH}: no dense Jacobian blocks"
    return ("parallel" if forward else "sequential"), ("parallel" if adjoint else "sequential"), reason


def _structure_text(structure: StepStructure, jacobian: str) -> str:
    """What the step's proven structure does to its solve, for the reason."""
    text = f"{structure.label} step (proven from the traced step graph)"
    if structure.diagonal and jacobian == "full":
        text += ": exact diagonal Jacobian blocks at any width"
    if structure.affine and jacobian == "full":
        text += ", one linear solve" if structure.diagonal else ": one linear solve"
    if structure.maxplus and jacobian == "full":
        text += ", one max-plus pass"
    return text


def _denoise_cost_model(device_type, batch, width, length):
    """(forward, adjoint, reason) for a denoising loop: Picard over a window, or the plain loop.

    Windowed Picard does ``iterations * W`` denoiser evaluations where the loop
    does ``L``; on the measured chains (benchmarks/diffusion_sampling.py) the
    window advances about 2 to 5 steps per iteration, so the parallel forward
    pays only where one batched call over ``W`` steps costs less than about
    2 to 5 single calls. That holds on a GPU below saturation (ParaDiGMS: 1.8
    to 3.1x on A100s), not on a CPU: a batched call costs about ``W`` single
    ones once the denoiser does real work, and no less than about 3 for a tiny
    one (per-op overhead), plus the solver's own work per iteration.
    """
    if device_type == "cuda" and length >= GPU_MIN_LENGTH:
        return "parallel", "sequential", (
            f"GPU cost model: a batched denoiser call over the window costs about one call (L >= {GPU_MIN_LENGTH})"
        )
    if device_type == "cuda":
        return "sequential", "sequential", f"GPU cost model: denoising loop shorter than {GPU_MIN_LENGTH} steps"
    return "sequential", "sequential", (
        f"CPU cost model: a denoising loop stays sequential (a batched denoiser call over {DENOISE_WINDOW} steps "
        "costs several single calls on a CPU while Picard advances 2 to 5 steps per iteration; "
        "policy='parallel' forces the parallel solve)"
    )


def _denoise_jacobian(lyapunov: float | None, span: int) -> tuple[str, str]:
    """("identity" or "estimate", why) for a denoising chain solved over windows of ``span`` steps.

    Picard's linearisation ``A = I`` is off by ``c_l - 1`` where a step scales
    its input by ``c_l`` (DDPM and Euler ancestral steps contract, a UNet with
    random weights expands); the estimate ``A = c_l I`` removes that error at
    one VJP per position, made once (an evaluation with it costs
    ``ESTIMATE_COST`` forward evaluations; later iterations evaluate ``f``
    alone). The Lyapunov probe measures ``lambda ~ mean log c_l``; the
    estimate is chosen where ``span * |lambda| >= ESTIMATE_MIN_SPREAD``, where
    the measured saving in iterations exceeds the ``L`` VJPs. Without a probe (it runs under
    policy='auto' only, and fails on ops without forward-mode AD) Picard.
    """
    if lyapunov is None or not math.isfinite(lyapunov):
        return "identity", (
            f"no Lyapunov probe (it runs under policy='auto'), so Picard: the estimate (jacobian='estimate') "
            f"costs one VJP per position ({ESTIMATE_COST:g}x an evaluation, once) and saves more than that only "
            f"where the window times |lambda| is >= {ESTIMATE_MIN_SPREAD:g} (measured)"
        )
    spread = span * abs(lyapunov)
    if spread >= ESTIMATE_MIN_SPREAD:
        return "estimate", (
            f"window {span} x |lambda| {abs(lyapunov):.3g} = {spread:.3g} >= {ESTIMATE_MIN_SPREAD:g}: the steps scale "
            f"their input far enough from 1 that the estimate saves more iterations than its one VJP per position "
            f"({ESTIMATE_COST:g}x an evaluation, once) costs (measured)"
        )
    return "identity", (
        f"window {span} x |lambda| {abs(lyapunov):.3g} = {spread:.3g} < {ESTIMATE_MIN_SPREAD:g}: the steps are "
        f"close enough to the identity that the estimate (jacobian='estimate', one VJP per position, "
        f"{ESTIMATE_COST:g}x an evaluation) saves fewer iterations than it costs (measured)"
    )


def _denoise_solver(jacobian: str, window, choice: str) -> str:
    """Why a denoising chain is solved the way it is; ``choice``: why this Jacobian."""
    span = "the whole chain" if window is None else f"a sliding window of {window} steps"
    if jacobian == "identity":
        return (
            f"Picard iteration (identity Jacobian) over {span}: each iteration costs one batched denoiser "
            f"call; {choice}"
        )
    if jacobian == "estimate":
        return (
            f"quasi-Newton with the Jacobian estimated as c_l I (one VJP per position) over {span}: {choice}"
        )
    return f"{jacobian} Jacobians over {span} ({choice})"
