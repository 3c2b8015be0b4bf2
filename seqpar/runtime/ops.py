"""The chain solve as ``torch.library`` custom ops: one opaque op per chain.

``seqpar::chain_solve(program, s0, xs, shared, layer_params) -> states`` runs
the solve of a registered :class:`~seqpar.runtime.program.ChainProgram` on
packed tensors (``s0``: ``(N, w)``, states: ``(L, N, w)``): Newton, or the
sequential loop where the program's ``method`` is ``"sequential"`` (the
backend's rolled loop). ``layer_params`` are per-layer parameters, not yet
stacked: ``P`` groups of ``L`` tensors, group-major; they are stacked once and
the stack is cached until a parameter changes (its ``_version`` or storage)
and placed into the per-step inputs at the program's ``param_slots``. Its fake implementation
gives aot_autograd and inductor the output shape; its autograd formula is the
exact adjoint, itself the op ``seqpar::chain_adjoint``. Programs are referred
to by an integer id because custom ops take tensors and plain values only.
"""

from __future__ import annotations

import logging

import torch

from .adjoint import adjoint_solve
from .newton import newton_solve
from .sequential import solve_sequentially

log = logging.getLogger("seqpar.runtime")

_PROGRAMS: dict = {}
_STACKS: dict = {}


def register_program(program) -> int:
    """Make ``program`` callable through the ops; returns its id."""
    _PROGRAMS[program.id] = program
    return program.id


def program_by_id(program_id: int):
    return _PROGRAMS[program_id]


def per_step_inputs(chain, xs, layer_params):
    """The program's per-step input leaves: ``xs`` with the stacked layer parameters inserted."""
    slots = getattr(chain, "param_slots", ())
    if not slots:
        return list(xs)
    signature = tuple((tensor.data_ptr(), tensor._version) for tensor in layer_params)
    cached = _STACKS.get(chain.id)
    if cached is None or cached[0] != signature:
        length = chain.length
        stacked = [
            torch.stack([tensor.detach() for tensor in layer_params[j * length : (j + 1) * length]])
            for j in range(len(slots))
        ]
        cached = _STACKS[chain.id] = (signature, stacked)
    leaves, rest = [], iter(xs)
    stacked = dict(zip(slots, cached[1]))
    for index in range(len(slots) + len(xs)):
        leaves.append(stacked[index] if index in stacked else next(rest))
    return leaves


@torch.library.custom_op("seqpar::chain_solve", mutates_args=())
def chain_solve(
    program: int,
    s0: torch.Tensor,
    xs: list[torch.Tensor],
    shared: list[torch.Tensor],
    layer_params: list[torch.Tensor],
) -> torch.Tensor:
    """States ``s_1 .. s_L`` of the chain ``program`` started at ``s0``."""
    chain = _PROGRAMS[program]
    leaves = per_step_inputs(chain, xs, layer_params)
    if chain.method == "sequential":
        states, stats = solve_sequentially(chain, s0, leaves, shared, chain.sequential_reason)
    else:
        states, stats = newton_solve(chain, s0, leaves, shared, **chain.solver_options)
    if chain.check_next is not None:
        states, stats = _checked(chain, s0, leaves, shared, states, stats)
    chain.last_stats = stats
    if states.storage_offset() or not states.is_contiguous():
        # The solver may return a view into its work buffer; the op's (fake) contract
        # is a fresh contiguous tensor at offset 0.
        states = states.clone(memory_format=torch.contiguous_format)
    return states


def _checked(chain, s0, leaves, shared, states, stats):
    """Compare the solve with the sequential loop by ``chain.check_next`` (consumed).

    On a mismatch the chain is solved sequentially from then on and this call
    returns the sequential states: a wrong solve never reaches the caller.
    """
    check, chain.check_next = chain.check_next, None
    if chain.method == "sequential":
        chain.last_check = (True, "sequential loop: nothing to check")
        return states, stats
    reference, reference_stats = solve_sequentially(chain, s0, leaves, shared, "")
    ok, detail = check(reference, states)
    chain.last_check = (ok, detail)
    if ok:
        return states, stats
    chain.method = "sequential"
    chain.sequential_reason = reference_stats.fallback = f"verification mismatch ({detail}); sequential from then on"
    log.warning("seqpar: chain of %d steps: %s", chain.length, chain.sequential_reason)
    return reference, reference_stats


@chain_solve.register_fake
def _chain_solve_fake(program, s0, xs, shared, layer_params):
    return s0.new_empty(_PROGRAMS[program].length, *s0.shape)


@torch.library.custom_op("seqpar::chain_adjoint", mutates_args=())
def chain_adjoint(
    program: int,
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
    chain = _PROGRAMS[program]
    leaves = per_step_inputs(chain, xs, layer_params)
    grad_s0, grad_leaves, grad_shared = adjoint_solve(chain, s0, leaves, shared, states, grad_states)
    slots = set(getattr(chain, "param_slots", ()))
    grad_xs = [grad for index, grad in enumerate(grad_leaves) if index not in slots]
    grad_layers = [part.clone() for index in sorted(slots) for part in grad_leaves[index].unbind(0)]
    inputs = [*xs, *shared, *layer_params]
    grads = [*grad_xs, *grad_shared, *grad_layers]
    return [grad_s0.contiguous()] + [
        torch.zeros_like(tensor) if grad is None else grad.contiguous() for tensor, grad in zip(inputs, grads)
    ]


@chain_adjoint.register_fake
def _chain_adjoint_fake(program, s0, xs, shared, layer_params, states, grad_states):
    return [torch.empty_like(s0)] + [torch.empty_like(tensor) for tensor in [*xs, *shared, *layer_params]]


def _setup_context(ctx, inputs, output):
    program, s0, xs, shared, layer_params = inputs
    ctx.program = program
    ctx.counts = (len(xs), len(shared))
    ctx.save_for_backward(s0, *xs, *shared, *layer_params, output)


def _backward(ctx, grad_states):
    s0, *rest, states = ctx.saved_tensors
    n_xs, n_shared = ctx.counts
    xs, shared, layer_params = rest[:n_xs], rest[n_xs : n_xs + n_shared], rest[n_xs + n_shared :]
    grads = torch.ops.seqpar.chain_adjoint(
        ctx.program, s0, xs, shared, layer_params, states, grad_states.contiguous()
    )
    rest_grads = [grad if tensor.is_floating_point() else None for grad, tensor in zip(grads[1:], rest)]
    return (
        None,
        grads[0],
        rest_grads[:n_xs],
        rest_grads[n_xs : n_xs + n_shared],
        rest_grads[n_xs + n_shared :],
    )


chain_solve.register_autograd(_backward, setup_context=_setup_context)
