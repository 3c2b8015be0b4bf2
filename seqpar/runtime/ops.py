"""The chain solve as ``torch.library`` custom ops: one opaque op per chain.

``seqpar::chain_solve(program, s0, xs, shared) -> states`` runs the Newton
solve of a registered :class:`~seqpar.runtime.program.ChainProgram` on packed
tensors (``s0``: ``(N, w)``, states: ``(L, N, w)``). Its fake implementation
gives aot_autograd and inductor the output shape; its autograd formula is the
exact adjoint, itself the op ``seqpar::chain_adjoint``. Programs are referred
to by an integer id because custom ops take tensors and plain values only.
"""

from __future__ import annotations

import torch

from .adjoint import adjoint_solve
from .newton import newton_solve

_PROGRAMS: dict = {}


def register_program(program) -> int:
    """Make ``program`` callable through the ops; returns its id."""
    _PROGRAMS[program.id] = program
    return program.id


def program_by_id(program_id: int):
    return _PROGRAMS[program_id]


@torch.library.custom_op("seqpar::chain_solve", mutates_args=())
def chain_solve(program: int, s0: torch.Tensor, xs: list[torch.Tensor], shared: list[torch.Tensor]) -> torch.Tensor:
    """States ``s_1 .. s_L`` of the chain ``program`` started at ``s0``."""
    chain = _PROGRAMS[program]
    states, stats = newton_solve(chain, s0, xs, shared, **chain.solver_options)
    chain.last_stats = stats
    return states


@chain_solve.register_fake
def _chain_solve_fake(program, s0, xs, shared):
    return s0.new_empty(_PROGRAMS[program].length, *s0.shape)


@torch.library.custom_op("seqpar::chain_adjoint", mutates_args=())
def chain_adjoint(
    program: int,
    s0: torch.Tensor,
    xs: list[torch.Tensor],
    shared: list[torch.Tensor],
    states: torch.Tensor,
    grad_states: torch.Tensor,
) -> list[torch.Tensor]:
    """``[d s0, *d xs, *d shared]`` by implicit differentiation (zeros for integer leaves)."""
    grad_s0, grad_xs, grad_shared = adjoint_solve(_PROGRAMS[program], s0, xs, shared, states, grad_states)
    inputs = [*xs, *shared]
    grads = [*grad_xs, *grad_shared]
    return [grad_s0.contiguous()] + [
        torch.zeros_like(tensor) if grad is None else grad.contiguous() for tensor, grad in zip(inputs, grads)
    ]


@chain_adjoint.register_fake
def _chain_adjoint_fake(program, s0, xs, shared, states, grad_states):
    return [torch.empty_like(s0)] + [torch.empty_like(tensor) for tensor in [*xs, *shared]]


def _setup_context(ctx, inputs, output):
    program, s0, xs, shared = inputs
    ctx.program = program
    ctx.counts = (len(xs), len(shared))
    ctx.save_for_backward(s0, *xs, *shared, output)


def _backward(ctx, grad_states):
    s0, *rest, states = ctx.saved_tensors
    n_xs, _ = ctx.counts
    xs, shared = rest[:n_xs], rest[n_xs:]
    grads = torch.ops.seqpar.chain_adjoint(ctx.program, s0, xs, shared, states, grad_states.contiguous())
    differentiable = [tensor.is_floating_point() for tensor in rest]
    rest_grads = [grad if keep else None for grad, keep in zip(grads[1:], differentiable)]
    return None, grads[0], rest_grads[:n_xs], rest_grads[n_xs:]


chain_solve.register_autograd(_backward, setup_context=_setup_context)
