"""``solve_chain``: the runtime's public entry point.

Solves ``s_l = step(s_{l-1}, x_l, *shared)``, ``l = 1..L``, in O(log L) depth
per iteration and returns all states stacked. Differentiable w.r.t. ``s0``,
``xs`` and ``shared`` by exact implicit differentiation.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from . import estimates, ops, step_cache
from .adjoint import prepare_adjoint
from .budget import memory_window, memory_window_reason
from .newton import Tolerance, evaluated_positions
from .precision import autocast_state, computing_dtype
from .program import ChainProgram, StateLayout, lower_packed_step, windowed_steps
from .spec import (
    ADJOINT_CHOICES,
    FORWARD_CHOICES,
    JACOBIAN_CHOICES,
    default_max_iters,
    forward_block_kind,
    resolve_adjoint,
    resolve_jacobian,
)
from .rolled import draws_random
from .stats import SolveStats
from .structure import step_structure

log = logging.getLogger("seqpar.runtime")


def solve_chain(
    step: Callable,
    s0: Any,
    xs: Any = (),
    shared=(),
    *,
    jacobian: str = "auto",
    tol=None,
    max_iters: int | None = None,
    damping: float | None = None,
    window: int | None = None,
    length: int | None = None,
    batch_ndim: int | None = None,
    adjoint: str = "auto",
    forward: str = "parallel",
    return_stats: bool = False,
):
    """All states of the chain ``s_l = step(s_{l-1}, x_l, *shared)``, ``l = 1..L``.

    Args:
        step: pure function ``(s_prev, x_l, *shared) -> s_l``; ``s_l`` has the
            structure, shapes and dtype of ``s_prev``. Its leading ``batch_ndim``
            dims are batch dims that the step treats independently. It is
            traced once and the trace reused while the step's code and the
            Python values it reads (closure, defaults, module globals) are
            the same (:mod:`seqpar.runtime.step_cache`); every call checks the
            trace's first step against the step itself and retraces on a
            difference.
        s0: initial state, a tensor or a tuple of tensors of shape ``(*batch, *state)``.
        xs: per-step inputs, a pytree of tensors stacked on dim 0 (length ``L``);
            ``step`` receives slice ``l``.
        shared: tensors every step reads (weights of an RNN cell or a denoiser).
        jacobian: ``"full"`` (Newton), ``"diag"`` (quasi-Newton with the true
            diagonal of J), ``"estimate"`` (quasi-Newton with ``J ~ c I`` per
            step from one VJP, :func:`~seqpar.runtime.program.rayleigh_estimate`),
            ``"identity"`` (Picard) or ``"auto"``: full up to 64 state values
            per batch element, identity above. A step whose Jacobian the
            traced graph proves diagonal (every state value updated from
            itself alone: elementwise gates, Mamba's selective scan;
            :mod:`~seqpar.runtime.structure`) is solved with its exact
            diagonal blocks, one VJP per position, at any width: ``"auto"``
            and ``"diag"`` mean ``"full"`` for it, and ``"full"`` is served by
            the diagonal (exact Newton). A step proven affine in the state
            (``s_l = A_l s_{l-1} + c_l``) with exact blocks is solved by one
            linear solve (:func:`~seqpar.runtime.newton.linear_solve`).
        tol: stop when ``max_k |ds_k| <= atol + rtol max_k |s_k|`` for every
            state vector (relative to the state's own magnitude: tiny states
            are solved as accurately as large ones); a float is ``rtol`` (with
            ``atol`` the dtype's smallest normal number), a pair is
            ``(atol, rtol)``; default ``rtol`` by dtype: 1e-10 (float64), 1e-5
            (float32), 1e-3 (float16), 8e-3 (bfloat16), ten times smaller in
            float32/64 for every Jacobian but ``"full"`` (linear convergence:
            the error after the last update is not its square).
        max_iters: parallel iterations before the rest of the chain is evaluated
            sequentially (default 40, at most ``L``).
        damping: ``lambda >= 0``. ``0`` (or ``None``): plain Newton steps.
            ``> 0``: Levenberg-Marquardt (ELK) steps ``(J^T J + lambda I) ds =
            J^T c`` that stay finite where the Newton step overflows (long
            chains with expanding Jacobians in float32); ``lambda`` starts at
            ``damping`` and is adapted per iteration within ``[1e-6, 1e3] x damping``.
            Costs a block-tridiagonal solve per iteration besides the Newton one;
            on chains Newton already handles it usually needs more iterations.
            An affine chain's one linear solve is exact and takes none.
        window: at most this many active positions per iteration (sliding
            window, ParaDiGMS); ``None``: the whole chain. Either way at most
            the positions whose Jacobian blocks fit 1/16 of the device's
            memory (:mod:`~seqpar.runtime.budget`; logged where that bounds it).
        length: ``L`` when ``xs`` is empty.
        batch_ndim: number of leading batch dims of the state (default: all but
            the last dim of the first state tensor).
        adjoint: backward solve, ``"parallel"`` (PCR on full Jacobians),
            ``"sequential"`` (one VJP per step) or ``"auto"`` (parallel up to 64
            state values, and at any width for a diagonal step). Both are exact.
        forward: ``"parallel"`` (the iterative solve) or ``"sequential"`` (the
            plain loop inside the op; with ``adjoint="parallel"`` the fastest
            training step on a CPU, where the parallel forward loses).
        return_stats: also return the :class:`~seqpar.runtime.SolveStats`.

    Returns:
        The states ``s_1 .. s_L`` stacked on a new dim 0 (a tuple of such
        tensors for a tuple state), and the stats if ``return_stats``.
    """
    if without_elements(s0):
        _check_choices(jacobian=jacobian, adjoint=adjoint, forward=forward)
        return plain_loop(step, s0, xs, shared, length, batch_ndim, return_stats)
    program, packed_s0, xs_leaves, shared = prepare_chain(
        step, s0, xs, shared, jacobian=jacobian, tol=tol, max_iters=max_iters, damping=damping, window=window,
        length=length, batch_ndim=batch_ndim, adjoint=adjoint, forward=forward,
    )
    packed = torch.ops.seqpar.chain_solve(program.id, packed_s0, xs_leaves, shared, [])
    states = program.layout.unpack(packed)
    return (states, ops.call_state(program).thread.last_stats) if return_stats else states


def _check_choices(**values) -> None:
    choices = {"jacobian": JACOBIAN_CHOICES, "adjoint": ADJOINT_CHOICES, "forward": FORWARD_CHOICES}
    for name, value in values.items():
        if value not in choices[name]:
            raise ValueError(f"{name} must be one of {choices[name]}, got {value!r}")


def without_elements(s0) -> bool:
    """Whether the state ``s0`` (a tensor or a pytree of them) has a tensor without elements (a batch of 0)."""
    return any(isinstance(leaf, torch.Tensor) and leaf.numel() == 0 for leaf in pytree.tree_leaves(s0))


def plain_loop(step, s0, xs, shared, length, batch_ndim, return_stats):
    """:func:`solve_chain` for a state without elements: nothing to solve for. The states are the step's, called
    one after another (recorded by autograd), and the stats say so (also each rank's share of
    :func:`seqpar.distributed.solve_chain`)."""
    _, xs_leaves, xs_spec, shared, length, _ = _validate(step, s0, xs, shared, length, batch_ndim)
    states, state = [], s0
    for index in range(length):
        state = step(state, pytree.tree_unflatten([leaf[index] for leaf in xs_leaves], xs_spec), *shared)
        states.append(state)
    stacked = pytree.tree_map(lambda *leaves: torch.stack(leaves), *states)
    stats = SolveStats(length=length, jacobian="none", converged=True, fallback="the state has no elements",
                       sequential_steps=length, evaluations=length)
    return (stacked, stats) if return_stats else stacked


def prepare_chain(step, s0, xs, shared, *, jacobian, tol, max_iters, damping, window, length, batch_ndim, adjoint,
                  forward):
    """:func:`solve_chain`'s arguments validated and its program built: ``(program, packed s0 (N, w), xs leaves,
    shared)``. Bad arguments raise ``ValueError`` naming them; a cached trace whose first step no longer agrees
    with the step (it reads a Python value that changed) is traced anew, with a warning."""
    layout, xs_leaves, xs_spec, shared, length, first = _validate(step, s0, xs, shared, length, batch_ndim)
    _check_choices(jacobian=jacobian, adjoint=adjoint, forward=forward)
    arguments = (step, layout, length, xs_spec, xs_leaves, shared)
    requests = dict(jacobian=jacobian, adjoint=adjoint, forward=forward, options=(tol, max_iters, damping, window))
    packed_s0 = layout.pack(s0).contiguous()
    program = _solver_program(*arguments, **requests)
    # Under torch.compile the tensors are fake and Dynamo's own guards see the Python values the step reads.
    if not torch.compiler.is_compiling() and not _first_step_agrees(
        program, packed_s0, xs_leaves, shared, layout.pack(first)
    ):
        log.warning(
            "seqpar.solve_chain: the step's first state differs from its cached trace: the step reads a Python "
            "value that changed (pass such values as tensors in shared); retraced"
        )
        program = _solver_program(*arguments, **requests, retrace=True)
    return program, packed_s0, xs_leaves, shared


@torch.compiler.disable  # tracing and caching, not computation: Dynamo runs it as it is (one graph break)
def _solver_program(step, layout, length, xs_spec, xs_leaves, shared, *, jacobian, adjoint, forward, options,
                    retrace=False) -> ChainProgram:
    """``solve_chain``'s program: ``"auto"`` resolved for the step's width and structure (proven on its lowered
    graph, :func:`lowered_step`, before anything else is traced), ``options`` ``(tol, max_iters, damping,
    window)`` validated; ``retrace``: lower and trace anew."""
    lowered = lowered_step(step, layout, xs_spec, xs_leaves, shared, retrace=retrace)
    random = sorted({str(node.target) for node in lowered.graph.nodes if draws_random(node.target)})
    if random:
        raise ValueError(
            f"step draws random numbers ({', '.join(random)}): a chain solved in parallel evaluates each step "
            "several times, and every evaluation would draw anew; draw them up front and pass them through xs "
            "(dropout: call the model in eval mode, or pass the masks)"
        )
    diagonal = step_structure(lowered).diagonal
    jacobian = resolve_jacobian(jacobian, layout.width, diagonal)
    adjoint = resolve_adjoint(adjoint, layout.width, diagonal)
    tol, max_iters, damping, window = options
    precision = computing_dtype(lowered, layout.dtype)
    solver_options = validated_solver_options(tol, max_iters, damping, precision, length, jacobian, window,
                                              layout=layout, diagonal=diagonal)
    if forward == "sequential":
        jacobian = "identity"  # the forward needs no Jacobians
    return build_program(
        step, layout, length, xs_spec, xs_leaves, shared, jacobian, adjoint, solver_options, method=forward,
        lowered=lowered, retrace=retrace,
    )


def _trace_key(step, step_key, layout, xs_spec, xs_leaves, shared) -> tuple:
    """What a step's traces depend on besides the methods: its name (``step_key``, by default
    :func:`~seqpar.runtime.step_cache.step_identity`), the shapes and dtypes of everything it reads and the
    autocast settings in force (the trace takes their casts)."""
    return (
        step_cache.step_identity(step) if step_key is None else step_key,
        autocast_state(),
        layout,
        xs_spec,
        tuple((leaf.shape, leaf.dtype) for leaf in xs_leaves),
        tuple((tensor.shape, tensor.dtype) for tensor in shared),
    )


def lowered_step(step, layout, xs_spec, xs_leaves, shared, *, step_key=None, retrace=False) -> torch.fx.GraphModule:
    """The packed step lowered at one position (:func:`~seqpar.runtime.program.lower_packed_step`).

    Cached like the programs (:func:`build_program`, which builds on it), by
    the step's name and the shapes, so that the step's structure
    (:func:`~seqpar.runtime.structure.step_structure`) can choose the
    Jacobians before the program is traced, and that costs no second trace.
    ``retrace``: lower anew (and cache that).
    """
    key = _trace_key(step, step_key, layout, xs_spec, xs_leaves, shared)
    lowered = None if retrace else step_cache.lookup(key, "lowered")
    if lowered is None:
        with _naming_closed_over_tensors():
            lowered = lower_packed_step(step, layout, xs_spec, xs_leaves, shared)
        step_cache.store(key, lowered, step, "lowered")
    return lowered


@torch.compiler.disable  # tracing and caching, not computation: Dynamo runs it as it is (one graph break)
def build_program(
    step,
    layout,
    length,
    xs_spec,
    xs_leaves,
    shared,
    jacobian,
    adjoint,
    solver_options,
    frozen=frozenset(),
    *,
    method="parallel",
    sequential_reason="forward='sequential'",
    loop="exact",
    param_slots=(),
    step_key=None,
    outputs=None,
    outputs_key=None,
    outputs_at_next=False,
    own=False,
    retrace=False,
    lowered=None,
) -> ChainProgram:
    """A registered :class:`ChainProgram` for ``step``, its traces reused while step, shapes and methods are the same.

    The traces are cached under the step's name (``step_key``, by default
    :func:`~seqpar.runtime.step_cache.step_identity`), the shapes, ``jacobian``,
    ``adjoint`` and ``frozen`` (inputs without gradients: ``("xs", i)`` /
    ``("shared", i)``) and the per-step outputs function ``outputs`` (named by
    ``outputs_key``, by default like the step; ``outputs_at_next``: it takes
    the step's result ``s_l``, not ``s_{l-1}``); the run spec (``solver_options``, ``method``: the
    forward solve, "parallel" or "sequential", recorded in the stats with
    ``sequential_reason``; ``loop``: how a sequential forward may run,
    :data:`~seqpar.runtime.spec.LOOP_CHOICES`; ``param_slots``) is the
    program's own: a cached program with another run spec is copied with this
    one (:meth:`ChainProgram.replace`). ``own``: the caller gets a program no
    other caller holds (a compiled graph, whose verification may demote its
    program); ``retrace``: trace anew even when traces are cached;
    ``lowered``: the step already lowered (:func:`lowered_step`), else
    :func:`lowered_step` is asked (with ``retrace``).
    """
    key = (
        *_trace_key(step, step_key, layout, xs_spec, xs_leaves, shared),
        length,
        jacobian,
        adjoint,
        frozen,
        None if outputs is None else step_cache.step_identity(outputs) if outputs_key is None else outputs_key,
        outputs_at_next,
    )
    run = dict(
        solver_options=solver_options, method=method, sequential_reason=sequential_reason, loop=loop,
        param_slots=tuple(param_slots),
    )
    program = None if retrace else step_cache.lookup(key)
    if program is None:
        if lowered is None:
            lowered = lowered_step(step, layout, xs_spec, xs_leaves, shared, step_key=step_key, retrace=retrace)
        with _naming_closed_over_tensors():
            program = ChainProgram(
                step, layout, length, xs_spec, xs_leaves, shared, jacobian, adjoint, frozen, lowered,
                outputs=outputs, outputs_at_next=outputs_at_next, **run,
            )
        step_cache.store(key, program, (step, outputs))
    elif own or program.run != run:
        program = program.replace(**run)
        if not own:
            step_cache.store(key, program, (step, outputs))
    span = evaluated_positions(program, solver_options.get("window"))  # a window, or an affine chain's runs
    if method == "parallel" and span < length:  # trace now, not inside the op
        if jacobian == "estimate":
            estimates.prepare(program, span, xs_leaves, shared)
        else:
            windowed_steps(program, span, xs_leaves, shared)
    prepare_adjoint(program, xs_leaves, shared)
    ops.register_program(program)
    return program


@contextlib.contextmanager
def _naming_closed_over_tensors():
    """Tracing a step that closes over tensors raises a ValueError saying so."""
    try:
        yield
    except AssertionError as error:
        # Every argument is fake while the step is traced; a real tensor (printed
        # as ``tensor(...)`` in the message) can only be one the step closes over
        # (a global, a closure cell, a module attribute).
        message = str(error)
        if "convert all Tensors to FakeTensors" not in message or "tensor(" not in message:
            raise
        raise ValueError(
            "step reads tensors that are not its arguments (closed-over tensors); "
            "pass them through xs (per step) or shared"
        ) from error


def _first_step_agrees(program, s0, xs_leaves, shared, first) -> bool:
    """Whether the program's traced step maps ``s0`` to the step's own ``first`` state (packed ``(N, w)``).

    The traced graph is a decomposition of the step, so the two may round
    differently: they agree when ``max |a - b| <= 1024 eps max |b|`` (about 1e-4
    relative in float32), far below any change of a coefficient that matters.
    """
    with torch.no_grad():
        traced = program.lowered(s0, [leaf[0] for leaf in xs_leaves], list(shared))
    same = (traced == first) | (torch.isnan(traced) & torch.isnan(first))
    finite = torch.isfinite(first)
    scale = first.abs().where(finite, 0).max()
    allowed = 1024 * torch.finfo(first.dtype).eps * scale + torch.finfo(first.dtype).tiny
    return bool((same | ((traced - first).abs() <= allowed)).all())


def validated_solver_options(tol, max_iters, damping, dtype, length, jacobian="full", window=None, *,
                             layout=None, diagonal=False) -> dict:
    """The validated ``newton_solve`` keywords ``{tol, max_iters, damping, window}``, for ``solve_chain`` and the
    backend alike; their defaults come from :mod:`seqpar.runtime.spec`.

    ``tol=None``: by dtype and Jacobian kind (:meth:`Tolerance.resolve`);
    ``max_iters=None``: :func:`~seqpar.runtime.spec.default_max_iters` (more
    for a sliding window); any ``max_iters`` is capped at ``length`` (prefix
    exactness finishes a state per iteration); ``damping=None``: 0 (plain
    Newton); ``window`` ``>= length`` means the whole chain (``None``). With
    the chain's ``layout`` (and whether its step is ``diagonal``), a window
    bounded by the device's memory where the whole chain's Jacobian blocks
    do not fit (:func:`~seqpar.runtime.budget.memory_window`, logged). Bad
    values raise ValueError naming the argument.
    """
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")
    asked = window if window is not None and window < length else None
    window = asked
    if layout is not None:
        kind = forward_block_kind(jacobian, diagonal)
        window = memory_window(layout, length, kind, asked)
        if window != asked:
            log.info("chain of %d steps: %s", length, memory_window_reason(layout, length, kind, window))
    if max_iters is None:
        max_iters = default_max_iters(length, window)
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be a positive int, got {max_iters!r}")
    if damping is None:
        damping = 0.0
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < float("inf"):
        raise ValueError(f"damping must be a float >= 0, got {damping!r}")
    try:
        tolerance = Tolerance.resolve(tol, dtype, jacobian)
    except (TypeError, ValueError):
        raise ValueError(f"tol must be a float or an (atol, rtol) pair, got {tol!r}") from None
    if not (0 <= tolerance.atol < math.inf and 0 <= tolerance.rtol < math.inf and tolerance.atol + tolerance.rtol > 0):
        raise ValueError(f"tol must be finite, non-negative and not both zero, got {tol!r}")
    return {"tol": tolerance, "max_iters": min(max_iters, length), "damping": float(damping), "window": window}


def _validate(step, s0, xs, shared, length, batch_ndim):
    """Check the arguments; return the state layout, flattened inputs and ``L``."""
    if not callable(step):
        raise ValueError(f"step must be callable, got {type(step).__name__}")
    s0_leaves, s0_spec = pytree.tree_flatten(s0)
    if not s0_leaves or not all(isinstance(leaf, torch.Tensor) for leaf in s0_leaves):
        raise ValueError("s0 must be a tensor or a tuple of tensors")
    first = s0_leaves[0]
    if not first.is_floating_point():
        raise ValueError(f"s0 must be floating point, got {first.dtype}")
    if batch_ndim is None:
        batch_ndim = max(first.ndim - 1, 0)
    if not 0 <= batch_ndim <= min(leaf.ndim for leaf in s0_leaves):
        raise ValueError(f"batch_ndim={batch_ndim} does not fit s0's shapes {[tuple(l.shape) for l in s0_leaves]}")
    batch_shape = first.shape[:batch_ndim]
    for leaf in s0_leaves:
        _check_like(leaf, first, "s0")
        if leaf.shape[:batch_ndim] != batch_shape:
            raise ValueError(f"s0 tensors must share the batch shape {tuple(batch_shape)}, got {tuple(leaf.shape)}")

    xs_leaves, xs_spec = pytree.tree_flatten(xs)
    for path, leaf in pytree.tree_flatten_with_path(xs)[0]:
        name = "xs" + pytree.keystr(path)
        if not isinstance(leaf, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(leaf).__name__}")
        if leaf.ndim == 0:
            raise ValueError(f"{name} must be stacked on dim 0 (one slice per step), got a 0-d tensor")
        _check_like(leaf, first, name)
    lengths = {leaf.shape[0] for leaf in xs_leaves}
    if len(lengths) > 1:
        raise ValueError(f"xs tensors must have the same length along dim 0, got lengths {sorted(lengths)}")
    if lengths:
        (xs_length,) = lengths
        if length is not None and length != xs_length:
            raise ValueError(f"length={length} differs from the length of xs ({xs_length})")
        length = xs_length
    if length is None:
        raise ValueError("length must be given when xs is empty")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")

    if isinstance(shared, torch.Tensor):
        shared = (shared,)
    shared = list(shared)
    for index, tensor in enumerate(shared):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"shared[{index}] must be a tensor, got {type(tensor).__name__}")
        _check_like(tensor, first, f"shared[{index}]")

    layout = StateLayout(
        spec=s0_spec,
        batch_shape=batch_shape,
        leaf_shapes=tuple(leaf.shape[batch_ndim:] for leaf in s0_leaves),
        dtype=first.dtype,
        device=first.device,
    )
    first = _check_step(step, s0, xs_leaves, xs_spec, shared)
    return layout, xs_leaves, xs_spec, shared, length, first


def _check_like(tensor, reference, name):
    if tensor.is_complex():
        raise ValueError(
            f"{name} is {tensor.dtype}: solve_chain differentiates real tensors only (a complex input's gradient "
            "would be lost); pass torch.view_as_real(...) and rebuild it in the step with torch.view_as_complex"
        )
    if tensor.device != reference.device:
        raise ValueError(f"{name} is on {tensor.device}, but s0 is on {reference.device}")
    if tensor.is_floating_point() and tensor.dtype != reference.dtype:
        raise ValueError(f"{name} has dtype {tensor.dtype}, but s0 has {reference.dtype}")


def _check_step(step, s0, xs_leaves, xs_spec, shared):
    """Run the first step once: it must keep the state's structure, shapes and dtype; returns ``s_1``."""
    x0 = pytree.tree_unflatten([leaf[0] for leaf in xs_leaves], xs_spec)
    try:
        with torch.no_grad():
            s1 = step(s0, x0, *shared)
    except Exception as error:
        raise ValueError(f"step failed on (s0, xs[0]): {type(error).__name__}: {error}") from error
    s0_leaves, s0_spec = pytree.tree_flatten(s0)
    s1_leaves, s1_spec = pytree.tree_flatten(s1)
    if s1_spec != s0_spec or not all(isinstance(leaf, torch.Tensor) for leaf in s1_leaves):
        raise ValueError(f"step must return a state structured like s0 ({s0_spec}), got {s1_spec}")
    for before, after in zip(s0_leaves, s1_leaves):
        if after.shape != before.shape or after.dtype != before.dtype:
            raise ValueError(
                f"step changes the state from {tuple(before.shape)} {before.dtype} "
                f"to {tuple(after.shape)} {after.dtype}; a chain step must keep it"
            )
    return s1
