"""The chain solve as ``torch.library`` custom ops: one opaque op per chain.

``seqpar::chain_solve(program_id, s0, xs, shared, layer_params) -> states`` runs
the solve of a registered :class:`~seqpar.runtime.program.ChainProgram` on
packed tensors (``s0``: ``(N, w)``, states: ``(L, N, w)``): Newton, or the
sequential loop where the program's ``method`` is ``"sequential"`` (the
backend's rolled loop). ``layer_params`` are per-layer parameters, not yet
stacked: ``P`` groups of ``L`` tensors, group-major; they are stacked on every
call (no cache: an in-place update through ``p.data`` leaves no trace in
``_version``, so a cached stack could outlive the values it copies) and placed
into the per-step inputs at the program's ``param_slots``. Tensors enter the
solver in the contiguous format (a transposed, channels-last or expanded input
is copied once at the op's boundary). Its fake implementation gives
aot_autograd and inductor the output shape; its autograd formula is the exact
adjoint, itself the op ``seqpar::chain_adjoint``; under ``create_graph=True``
the gradient is instead that of the sequential loop, recorded by autograd, so
higher-order gradients are exact too.

``seqpar::chain_outputs(program_id, s0, states, xs, shared, layer_params) ->
Y`` serves a chain's per-step outputs ``y^j_l = g^j(s_{l-1}, x_l, *shared)``:
one batched evaluation of the program's ``outputs`` at the solved states,
``Y^j`` of shape ``(L, *y^j shape)`` (or, where ``chain_solve`` ran the fused
loop, the outputs that loop wrote along with these very states:
:func:`~.fused_loop.served_outputs`). Its autograd formula is the batched VJP
of ``g`` (the op ``seqpar::chain_outputs_vjp``), whose state cotangents reach
the states and through ``chain_solve``'s adjoint the whole chain:
``lam_l = dL/ds_l + (dg_{l+1}/ds_l)^T dL/dy_{l+1} + J_{l+1}^T lam_{l+1}``.

Programs are referred to by an integer id because custom ops take tensors and
plain values only.

Every op is tagged ``cudagraph_unsafe``: a solve reads its convergence on the
host and chooses its iterations, its fallback and its form per call, which a
CUDA graph's replay of one call's kernels would not; inductor's CUDA graphs
(``mode="reduce-overhead"``) capture the rest of the graph around the ops
(graph partition) and run the ops as they are.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Callable

import torch

from . import fused_loop
from .adjoint import adjoint_solve
from .newton import newton_solve
from .precision import in_float64
from .sequential import run_steps, sequential_stats, solve_columns, solve_sequentially
from .stream import run_in_blocks

log = logging.getLogger("seqpar.runtime")

# Programs by id, held weakly: a compiled graph's record, solve_chain's cache
# (:mod:`seqpar.runtime.step_cache`) and autograd graphs keep them alive.
_PROGRAMS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()


class ThreadCall(threading.local):
    """What one thread's call of a program hands between its caller and the solve (each thread sees its own).

    A caller and the solve it starts run in one thread (the op's forward runs
    in the calling thread), so another thread's call of the same program at
    the same time neither takes this thread's check nor overwrites the stats
    it returns. ``check``: a callable ``(sequential states, solver states,
    exact) -> (ok, detail)`` the thread's next solve is checked with, once
    (set by the caller); ``check_result``: that check's ``(ok, detail)``
    until the caller takes it; ``last_stats``: the
    :class:`~seqpar.runtime.stats.SolveStats` of the thread's last call.
    """

    check: Callable | None = None
    check_result: tuple[bool, str] | None = None
    last_stats: object = None


class CallState:
    """What the op's calls of one program leave behind; programs themselves are not written to at run time.

    Shared by every thread: ``last_stats``, the stats of the program's last
    call by any thread (what reports show); ``demoted``, why the program's
    forward runs sequentially from now on (a check that failed), ``None``
    while it runs as built. Each thread's own: ``thread``, a :class:`ThreadCall`.
    """

    def __init__(self):
        self.last_stats: object = None
        self.demoted: str | None = None
        self.thread = ThreadCall()

    def record(self, stats) -> None:
        """``stats`` of a call that just ended in this thread."""
        self.last_stats = self.thread.last_stats = stats


_STATES: "weakref.WeakKeyDictionary[object, CallState]" = weakref.WeakKeyDictionary()


def call_state(program) -> CallState:
    """The :class:`CallState` of ``program`` (made at first use, one even where two threads ask at once; freed with
    the program)."""
    state = _STATES.get(program)
    return state if state is not None else _STATES.setdefault(program, CallState())


def register_program(program) -> int:
    """Make ``program`` callable through the ops; returns its id."""
    _PROGRAMS[program.id] = program
    return program.id


def program_by_id(program_id: int):
    return _PROGRAMS[program_id]


def per_step_inputs(program, xs, layer_params):
    """The program's per-step input leaves: ``xs`` with the layer parameters, stacked now, inserted.

    Group ``j`` of ``layer_params`` (tensors ``j L .. (j + 1) L - 1``) becomes one
    ``(L, ...)`` tensor at position ``param_slots[j]``. The stack is differentiable
    (``torch.stack``) where autograd records, and made of detached tensors otherwise;
    contiguous, as every tensor the traced graphs take (channels-last parameters
    stack to a strided tensor).
    """
    return with_layer_groups(program, list(xs), layer_params, lambda group: torch.stack(group).contiguous())


def per_step_columns(program, xs, layer_params):
    """The per-step inputs as columns (``columns[i][l]``: leaf ``i`` of step ``l + 1``), nothing copied:
    the rows of each ``xs`` tensor (``unbind(0)``) and each group of layer parameters as it was handed over."""
    return with_layer_groups(program, [leaf.unbind(0) for leaf in xs], layer_params, list)


def with_layer_groups(program, xs, layer_params, combine):
    """``xs`` with ``combine(group j of layer_params)`` inserted at position ``param_slots[j]``."""
    slots = program.param_slots
    if not slots:
        return xs
    length = program.length
    groups = {slot: combine(layer_params[j * length : (j + 1) * length]) for j, slot in enumerate(slots)}
    rest = iter(xs)
    return [groups[index] if index in groups else next(rest) for index in range(len(slots) + len(xs))]


def _contiguous(tensors):
    return [tensor.contiguous() for tensor in tensors]


_LIBRARY = torch.library.Library("seqpar", "FRAGMENT")
_HOST_DECIDED = (torch.Tag.cudagraph_unsafe,)
_LIBRARY.define(
    "chain_solve(int program_id, Tensor s0, Tensor[] xs, Tensor[] shared, Tensor[] layer_params) -> Tensor",
    tags=_HOST_DECIDED,
)


def chain_solve(
    program_id: int,
    s0: torch.Tensor,
    xs: list[torch.Tensor],
    shared: list[torch.Tensor],
    layer_params: list[torch.Tensor],
) -> torch.Tensor:
    """States ``s_1 .. s_L`` of the registered program ``program_id`` started at ``s0``: the op's kernel, below autograd."""
    program = _PROGRAMS[program_id]
    state = call_state(program)
    s0, xs, shared = s0.contiguous(), _contiguous(xs), _contiguous(shared)
    if program.method == "sequential" or state.demoted:  # the rolled loop reads the layer parameters in place
        leaves = None
        columns = per_step_columns(program, xs, layer_params)
        # The op's forward runs below autograd (its backward is the adjoint): the loop is never recorded.
        reason = state.demoted or program.sequential_reason
        compiled = not state.demoted and program.loop in ("compiled", "fused")
        states, stats = solve_columns(program, s0, columns, shared, reason, recorded=False, compiled=compiled)
    else:
        begin = time.perf_counter()
        leaves = per_step_inputs(program, xs, layer_params)
        states, stats = newton_solve(program, s0, leaves, shared, **program.solver_options)
        stats.seconds = time.perf_counter() - begin
    if state.thread.check is not None:
        states, stats = _checked(program, state, s0, leaves, shared, states, stats)
    state.record(stats)
    return _fresh(states, ())  # the solver may return a view into its work buffer; it never aliases an input


def _unaliased(outputs: list[torch.Tensor], inputs) -> list[torch.Tensor]:
    """An op's list of outputs, each :func:`_fresh` against the ``inputs`` and the outputs before it (a custom op's
    outputs alias neither its inputs nor each other: the VJP of a per-step output that is the state itself is its
    cotangent, an input)."""
    fresh = []
    for value in outputs:
        fresh.append(_fresh(value, [*inputs, *fresh]))
    return fresh


def _fresh(value: torch.Tensor, inputs) -> torch.Tensor:
    """``value`` as an op may return it (its fake contract): contiguous, at offset 0 of its storage and sharing
    no storage with the op's ``inputs``; copied where it is not."""
    storage = value.untyped_storage().data_ptr()
    if value.storage_offset() or not value.is_contiguous() or any(
        tensor.untyped_storage().data_ptr() == storage for tensor in inputs
    ):
        return value.clone(memory_format=torch.contiguous_format)
    return value


def _checked(program, state, s0, leaves, shared, states, stats):
    """Compare the solve with the sequential loop by this thread's ``state.thread.check`` (consumed); the result in
    ``state.thread.check_result``.

    ``check(reference, states, exact)`` gets the sequential states and, as
    ``exact()``, the sequential loop run in float64 (``None`` where the step
    cannot run in float64), for chains whose own rounding the comparison must
    allow for. On a mismatch the chain is solved sequentially from then on and
    this call returns the sequential states: a wrong solve never reaches the caller.
    """
    check, state.thread.check = state.thread.check, None
    if leaves is None:  # the sequential loop ran
        state.thread.check_result = _NOTHING_TO_CHECK
        return states, stats
    reference, reference_stats = solve_sequentially(program, s0, leaves, shared, "")

    def exact():
        try:
            return run_steps(program, *in_float64((s0, leaves, shared)))
        except Exception as error:  # a step that fixes its dtype, or an op without float64
            log.info("seqpar: chain of %d steps: no float64 reference (%s)", program.length, error)
            return None

    ok, detail = check(reference, states, exact)
    state.thread.check_result = (ok, detail)
    if ok:
        return states, stats
    state.demoted = reference_stats.fallback = f"verification mismatch ({detail}); sequential from then on"
    log.warning("seqpar: chain of %d steps: %s", program.length, state.demoted)
    return reference, reference_stats


def _chain_solve_fake(program_id, s0, xs, shared, layer_params):
    return s0.new_empty(_PROGRAMS[program_id].length, *s0.shape)


_NOTHING_TO_CHECK = (True, "sequential loop: nothing to check")


def _register_kernel(name: str, kernel, fake) -> None:
    """``seqpar::<name>``'s kernel below autograd and its fake implementation (shapes for tracing)."""
    _LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"seqpar::{name}", fake, lib=_LIBRARY)


_register_kernel("chain_solve", chain_solve, _chain_solve_fake)


@torch.library.custom_op("seqpar::chain_adjoint", mutates_args=(), tags=_HOST_DECIDED)
def chain_adjoint(
    program_id: int,
    s0: torch.Tensor,
    xs: list[torch.Tensor],
    shared: list[torch.Tensor],
    layer_params: list[torch.Tensor],
    states: torch.Tensor,
    grad_states: torch.Tensor,
) -> list[torch.Tensor]:
    """``[d s0, *d xs, *d shared, *d layer_params]`` by implicit differentiation.

    Integer inputs get zeros (autograd drops them).
    """
    program = _PROGRAMS[program_id]
    s0, xs, shared = s0.contiguous(), _contiguous(xs), _contiguous(shared)
    leaves = per_step_inputs(program, xs, layer_params)
    grad_s0, grad_leaves, grad_shared = adjoint_solve(
        program, s0, leaves, shared, states.contiguous(), grad_states.contiguous()
    )
    gradients = [grad_s0] + _input_gradients(program, xs, shared, layer_params, grad_leaves, grad_shared)
    return _unaliased(gradients, [s0, *xs, *shared, *layer_params, states, grad_states])


def _input_gradients(program, xs, shared, layer_params, grad_leaves, grad_shared) -> list[torch.Tensor]:
    """``[*d xs, *d shared, *d layer_params]`` from the gradients of the per-step input leaves (layer
    parameter groups at ``param_slots``, split back per layer) and the shared inputs; zeros for ``None``
    (integer, frozen or unread inputs)."""
    slots = set(program.param_slots)
    grad_xs = [grad for index, grad in enumerate(grad_leaves) if index not in slots]
    grad_layers = []  # one per layer parameter; None for a frozen group
    for index in sorted(slots):
        group = grad_leaves[index]
        grad_layers += [None] * program.length if group is None else [part.clone() for part in group.unbind(0)]
    inputs = [*xs, *shared, *layer_params]
    grads = [*grad_xs, *grad_shared, *grad_layers]
    return [torch.zeros_like(tensor) if grad is None else grad.contiguous() for tensor, grad in zip(inputs, grads)]


@chain_adjoint.register_fake
def _chain_adjoint_fake(program_id, s0, xs, shared, layer_params, states, grad_states):
    return [torch.empty_like(s0)] + [torch.empty_like(tensor) for tensor in [*xs, *shared, *layer_params]]


class _ChainSolveFunction(torch.autograd.Function):
    """The op's autograd formula: the exact adjoint (the op ``seqpar::chain_adjoint``); under
    ``create_graph=True`` the gradient of the sequential loop, recorded (:func:`_recorded_gradients`).
    Takes the op's tensors flat (``s0, *xs, *shared, *layer_params``) with ``counts = (1, len(xs), len(shared))``."""

    @staticmethod
    def forward(program_id, counts, *tensors):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.seqpar.chain_solve.default(program_id, *_split(tensors, counts))

    @staticmethod
    def setup_context(ctx, inputs, output):
        program_id, counts, *tensors = inputs
        ctx.program_id = program_id
        ctx.program_object = _PROGRAMS[program_id]  # alive until the backward has run
        ctx.counts = counts
        ctx.save_for_backward(*tensors, output)

    @staticmethod
    def backward(ctx, grad_states):
        *tensors, states = ctx.saved_tensors
        s0, xs, shared, layer_params = _split(tensors, ctx.counts)
        if torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
            grads = _recorded_gradients(ctx.program_id, s0, xs, shared, layer_params, grad_states)
        else:
            grads = torch.ops.seqpar.chain_adjoint(
                ctx.program_id, s0, xs, shared, layer_params, states, grad_states.contiguous()
            )
        return (None, None, grads[0]) + tuple(
            grad if tensor.is_floating_point() else None for grad, tensor in zip(grads[1:], tensors[1:])
        )


def _split(tensors, counts):
    """``(*leading, xs, shared, layer_params)`` from an op's tensors flat; ``counts = (leading, xs, shared)``."""
    n_leading, n_xs, n_shared = counts
    leading, rest = list(tensors[:n_leading]), list(tensors[n_leading:])
    return (*leading, rest[:n_xs], rest[n_xs : n_xs + n_shared], rest[n_xs + n_shared :])


def _at_autograd_key(function, kernel, op, program_id, leading, xs, shared, layer_params):
    """An op at the autograd key: recorded by ``function`` (an autograd.Function taking ``program_id``,
    the counts and the tensors flat) where a gradient is wanted; otherwise ``kernel``, called directly on
    plain tensors (no tracing mode, no tensor subclass, no functorch transform: the dispatcher's keys below
    autograd would all pass them through), else ``op`` through the dispatcher below autograd (fake tensors,
    functionalization). ``leading``: the op's tensors before ``xs``."""
    tensors = (*leading, *xs, *shared, *layer_params)
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors):
        return function.apply(program_id, (len(leading), len(xs), len(shared)), *tensors)
    if _plain(tensors):
        return kernel(program_id, *leading, xs, shared, layer_params)
    with torch._C._AutoDispatchBelowAutograd():
        return op(program_id, *leading, xs, shared, layer_params)


def _chain_solve_autograd(program_id, s0, xs, shared, layer_params):
    return _at_autograd_key(
        _ChainSolveFunction, chain_solve, torch.ops.seqpar.chain_solve.default, program_id, (s0,), xs, shared,
        layer_params,
    )


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)  # a Parameter dispatches as the tensor it wraps


def _plain(tensors) -> bool:
    """Whether the op's kernel may run on ``tensors`` without passing the dispatcher's lower keys."""
    return (
        torch._C._len_torch_dispatch_stack() == 0
        and torch._C._functorch.peek_interpreter_stack() is None
        and all(type(tensor) in _PLAIN_TYPES for tensor in tensors)
    )


_LIBRARY.impl("chain_solve", _chain_solve_autograd, "Autograd")


def _recorded_gradients(program_id, s0, xs, shared, layer_params, grad_states):
    """``[d s0, *d xs, *d shared, *d layer_params]`` of ``<grad_states, states>`` through the sequential loop,
    recorded by autograd (``create_graph=True``): exact, and differentiable again. ``None`` where an input
    does not require grad."""
    program = _PROGRAMS[program_id]
    counts = (1, len(xs), len(shared))

    def loop(*flat):
        s0, xs, shared, layer_params = _split(flat, counts)
        return run_steps(program, s0, per_step_inputs(program, xs, layer_params), shared)

    return _differentiated(loop, [s0, *xs, *shared, *layer_params], grad_states)


def _differentiated(fn, inputs, cotangents):
    """The VJP of ``fn(*inputs)`` with ``cotangents`` (``None`` for inputs that do not require grad): ``fn``'s
    own derivatives only (``torch.func.vjp``: an input computed from another input does not count twice, as it
    would under ``torch.autograd.grad`` of the whole graph), recorded by autograd, so differentiable again."""
    wanted = [index for index, tensor in enumerate(inputs) if tensor.requires_grad]

    def of_wanted(*parts):
        full = list(inputs)
        for index, part in zip(wanted, parts):
            full[index] = part
        return fn(*full)

    _, pullback = torch.func.vjp(of_wanted, *[inputs[index] for index in wanted])
    found = iter(pullback(cotangents))
    return [next(found) if tensor.requires_grad else None for tensor in inputs]


_LIBRARY.define(
    "chain_outputs(int program_id, Tensor s0, Tensor states, Tensor[] xs, Tensor[] shared, Tensor[] layer_params)"
    " -> Tensor[]",
    tags=_HOST_DECIDED,
)


def chain_outputs(program_id, s0, states, xs, shared, layer_params) -> list[torch.Tensor]:
    """``[Y^1, .., Y^J]``, ``Y^j_l = g^j(s_{l-1}, x_l, *shared)`` (or ``g^j(s_l, ..)``,
    :meth:`~.program.ChainProgram.output_states`)
    ``(L, *y^j shape)``: the per-step outputs of program ``program_id`` at the states ``states`` ``(L, N, w)``
    started at ``s0``, in one batched call."""
    program = _PROGRAMS[program_id]
    served = fused_loop.served_outputs(program, states)  # computed in the fused loop along with these states
    if served is not None:
        return served
    s0, states, xs, shared = s0.contiguous(), states.contiguous(), _contiguous(xs), _contiguous(shared)
    leaves = per_step_inputs(program, xs, layer_params)
    outputs = program.outputs_at(program.output_states(s0, states), leaves, shared)
    return _unaliased(list(outputs), [s0, states, *leaves, *shared, *layer_params])


def _chain_outputs_fake(program_id, s0, states, xs, shared, layer_params):
    return [s0.new_empty(shape, dtype=dtype) for shape, dtype in _PROGRAMS[program_id].output_shapes]


_register_kernel("chain_outputs", chain_outputs, _chain_outputs_fake)

_LIBRARY.define(
    "chain_stream(int program_id, Tensor s0, Tensor[] xs, Tensor[] shared, Tensor[] layer_params) -> Tensor[]",
    tags=_HOST_DECIDED,
)


def chain_stream(program_id, s0, xs, shared, layer_params) -> list[torch.Tensor]:
    """``[s_L, Y^1, .., Y^J]`` of the registered sequential program ``program_id`` started at ``s0``: what
    ``chain_solve`` (its last state) and ``chain_outputs`` give, the states never held at once (the loop runs in
    blocks, :mod:`.stream`). For graphs that record no autograd: the op has no derivative."""
    program = _PROGRAMS[program_id]
    state = call_state(program)
    s0, xs, shared = s0.contiguous(), _contiguous(xs), _contiguous(shared)
    columns = per_step_columns(program, xs, layer_params)
    compiled = program.loop in ("compiled", "fused")
    begin = time.perf_counter()
    final, outputs, how = run_in_blocks(program, s0, columns, lambda: per_step_inputs(program, xs, layer_params),
                                        shared, compiled)
    state.record(sequential_stats(program, program.sequential_reason, how, time.perf_counter() - begin))
    if state.thread.check is not None:  # the graph check's call: the sequential loop is the reference itself
        state.thread.check, state.thread.check_result = None, _NOTHING_TO_CHECK
    return _unaliased([final, *outputs], [s0, *xs, *shared, *layer_params])


def _chain_stream_fake(program_id, s0, xs, shared, layer_params):
    return [s0.new_empty(s0.shape), *_chain_outputs_fake(program_id, s0, None, xs, shared, layer_params)]


def _no_derivative(ctx, *grad_outputs):
    raise RuntimeError("seqpar::chain_stream has no derivative: seqpar runs it in graphs that record no autograd "
                       "(a graph compiled under torch.no_grad); a differentiated call compiles with chain_solve")


_register_kernel("chain_stream", chain_stream, _chain_stream_fake)
torch.library.register_autograd("seqpar::chain_stream", _no_derivative, lib=_LIBRARY)


@torch.library.custom_op("seqpar::chain_outputs_vjp", mutates_args=(), tags=_HOST_DECIDED)
def chain_outputs_vjp(
    program_id: int,
    s0: torch.Tensor,
    states: torch.Tensor,
    xs: list[torch.Tensor],
    shared: list[torch.Tensor],
    layer_params: list[torch.Tensor],
    grad_outputs: list[torch.Tensor],
) -> list[torch.Tensor]:
    """``[d s0, d states, *d xs, *d shared, *d layer_params]`` of ``sum_j <grad_outputs_j, Y^j>``: the batched
    VJP of ``g`` at the states it reads (:meth:`~.program.ChainProgram.output_states`; a state it does not read
    gets zeros)."""
    program = _PROGRAMS[program_id]
    if program.outputs_vjp is None:  # no floating-point output: nothing to differentiate
        return [torch.zeros_like(tensor) for tensor in [s0, states, *xs, *shared, *layer_params]]
    s0, states, xs, shared = s0.contiguous(), states.contiguous(), _contiguous(xs), _contiguous(shared)
    leaves = per_step_inputs(program, xs, layer_params)
    grad_at, grad_leaves, grad_shared = program.outputs_vjp(
        program.output_states(s0, states), leaves, shared, _contiguous(grad_outputs)
    )
    if program.outputs_at_next:
        grad_s0, grad_states = torch.zeros_like(s0), grad_at
    else:
        grad_s0, grad_states = grad_at[0], torch.cat([grad_at[1:], torch.zeros_like(states[-1:])])
    gradients = [grad_s0, grad_states] + _input_gradients(program, xs, shared, layer_params, grad_leaves, grad_shared)
    return _unaliased(gradients, [s0, states, *xs, *shared, *layer_params, *grad_outputs])


@chain_outputs_vjp.register_fake
def _chain_outputs_vjp_fake(program_id, s0, states, xs, shared, layer_params, grad_outputs):
    return [torch.empty_like(tensor) for tensor in [s0, states, *xs, *shared, *layer_params]]


class _ChainOutputsFunction(torch.autograd.Function):
    """``chain_outputs``' autograd formula: the batched VJP of ``g`` (the op ``seqpar::chain_outputs_vjp``);
    under ``create_graph=True`` the VJP of the traced batched ``g``, recorded by autograd. Takes the op's
    tensors flat (``s0, states, *xs, *shared, *layer_params``)."""

    @staticmethod
    def forward(program_id, counts, *tensors):
        with torch._C._AutoDispatchBelowAutograd():
            return tuple(torch.ops.seqpar.chain_outputs.default(program_id, *_split(tensors, counts)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        program_id, counts, *tensors = inputs
        ctx.program_id, ctx.counts = program_id, counts
        ctx.program_object = _PROGRAMS[program_id]  # alive until the backward has run
        ctx.save_for_backward(*tensors)

    @staticmethod
    def backward(ctx, *grad_outputs):
        tensors = ctx.saved_tensors
        s0, states, xs, shared, layer_params = _split(tensors, ctx.counts)
        program = _PROGRAMS[ctx.program_id]
        if torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
            chosen = program.differentiable_outputs

            def differentiable(*flat):
                outputs = _recorded_outputs(program, *_split(flat, ctx.counts))
                return [outputs[index] for index in chosen]

            grads = _differentiated(differentiable, list(tensors), [grad_outputs[index] for index in chosen])
        else:
            grads = torch.ops.seqpar.chain_outputs_vjp(
                ctx.program_id, s0, states, xs, shared, layer_params, [grad.contiguous() for grad in grad_outputs]
            )
        return (None, None) + tuple(
            grad if tensor.is_floating_point() else None for grad, tensor in zip(grads, tensors)
        )


def _recorded_outputs(program, s0, states, xs, shared, layer_params) -> list[torch.Tensor]:
    """The per-step outputs evaluated step by step by ``g`` itself (``create_graph=True``: the traced batched
    graphs are for values, not for autograd to record)."""
    leaves = per_step_inputs(program, list(xs), list(layer_params))
    at = program.output_states(s0, states)
    rows = [program.outputs_packed(at[l], [leaf[l] for leaf in leaves], list(shared)) for l in range(program.length)]
    return [torch.stack(column) for column in zip(*rows)]


def _chain_outputs_autograd(program_id, s0, states, xs, shared, layer_params):
    return list(_at_autograd_key(
        _ChainOutputsFunction, chain_outputs, torch.ops.seqpar.chain_outputs.default, program_id, (s0, states), xs,
        shared, layer_params,
    ))


_LIBRARY.impl("chain_outputs", _chain_outputs_autograd, "Autograd")
