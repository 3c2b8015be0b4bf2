"""Exact gradients of a solved chain by implicit differentiation.

At the solution ``s_l = f(s_{l-1}, x_l)`` the gradient of a loss with direct
gradients ``g_l = dLoss/ds_l`` follows the adjoint recursion

    lam_L = g_L,        lam_{l-1} = g_{l-1} + J_l^T lam_l,       J_l = df/ds(s_{l-1}, x_l),

a lower block-bidiagonal system in reverse order with transposed blocks. Then

    dLoss/ds_0 = J_1^T lam_1,   dLoss/dx_l = (df/dx_l)^T lam_l,   dLoss/dshared = sum_l (df/dshared)^T lam_l,

one batched vector-Jacobian product of all steps. ``"parallel"`` solves the
recursion with the PCR driver on the full Jacobians at the solution (exact even
when the forward solve used diagonal or identity blocks; for a step proven
diagonal they are its diagonal blocks ``(L, N, w)``, at any width); ``"sequential"`` runs
it as ``L`` vector-Jacobian products, for states too wide for dense blocks.
Nothing is differentiated through Newton iterations.
"""

from __future__ import annotations

import torch

from .pcr import solve_affine_recurrence


def adjoint_solve(program, s0, xs_leaves, shared, states, grad_states):
    """Gradients ``(d s0, [d x leaves], [d shared])`` of a chain given ``dLoss/dstates``.

    ``s0``: ``(N, w)``; ``states`` and ``grad_states``: ``(L, N, w)`` packed.
    """
    prev = torch.cat([s0.unsqueeze(0), states[:-1]], dim=0)
    if program.adjoint == "parallel":
        _, jacobians = program.full_jacobians(prev, xs_leaves, shared)
        lam = solve_affine_recurrence(jacobians, grad_states, program.adjoint_kind, reverse=True)
        grad_prev, grad_xs, grad_shared = program.steps_vjp(prev, xs_leaves, shared, lam)
        return grad_prev[0], list(grad_xs), list(grad_shared)
    return sequential_adjoint(program, prev, xs_leaves, shared, grad_states)


def sequential_adjoint(program, prev, xs_leaves, shared, grad_states):
    """The same recursion as ``L`` vector-Jacobian products, last step first."""
    grad_xs = [torch.zeros_like(leaf) if leaf.is_floating_point() else None for leaf in xs_leaves]
    grad_shared = [torch.zeros_like(tensor) if tensor.is_floating_point() else None for tensor in shared]
    lam = grad_states[-1]
    for index in reversed(range(program.length)):
        x_leaves = [leaf[index] for leaf in xs_leaves]
        grad_prev, grad_x, grad_sh = program.step_vjp(prev[index], x_leaves, list(shared), lam)
        for total, part in zip(grad_xs, grad_x):
            if part is not None:
                total[index] = part
        for total, part in zip(grad_shared, grad_sh):
            if part is not None:
                total += part
        lam = grad_prev if index == 0 else grad_states[index - 1] + grad_prev
    return lam, grad_xs, grad_shared
