"""The sequential adjoint of a chain as one generated Python loop.

The adjoint recursion (:mod:`.adjoint`)

    lam_L = g_L,        lam_{l-1} = g_{l-1} + J_l^T lam_l,

with at every step ``dx_l = (df/dx_l)^T lam_l`` and ``dshared += (df/dshared)^T
lam_l``, is ``L`` calls of the step's lowered VJP (``program.step_vjp``:
``(s_{l-1}, x_l, shared, lam_l) -> (J_l^T lam_l, dx_l, dshared_l)``). Called as
a ``GraphModule`` once per step, the pytree work on its arguments and results
and the row writes of ``dx_l`` cost more than its aten ops on small states
(28 and 12 of 75 ms for an affine step on ``(4, 256)`` over 1024 steps), and
the adjoint trained at 0.69-0.87x eager's autograd over the same loop. Here
the VJP graph's nodes are written out as the body of one loop, as
:mod:`.rolled` writes the forward (:class:`~.rolled.StepPlan`: the same
calls, each through its ``torch`` binding or C++ entry):

    def adjoint(prev, columns, shared, grads, x_grads, shared_grads):
        x0c, = columns
        sh0, = shared
        gx0, = x_grads                  # rows of the per-step inputs' gradient buffers
        gsh0, = shared_grads            # the shared tensors' gradient sums
        v2 = t(sh0)                     # nodes that read neither s, x_l nor lam: once
        c0 = grads[-1]                  # lam_L
        for l in range(len(prev) - 1, -1, -1):
            s = prev[l]
            x0 = x0c[l]
            v1 = sigmoid(x0)            # the VJP's calls as traced
            ...
            gx0[l].copy_(v4)
            gsh0.add_(v6)
            if l:
                c0 = add(grads[l - 1], v5)
        return v5                       # J_1^T lam_1: the gradient of s_0

The values are those of the per-step calls of ``program.step_vjp``, in the
same order (the shared gradients summed last step first, as before).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from .errors import brief
from .rolled import StepPlan

log = logging.getLogger("seqpar.runtime")


@dataclass
class AdjointLoop:
    """A program's generated adjoint loop: ``run(prev, columns, shared, grads, x_grads, shared_grads)`` returns
    the gradient of ``s_0`` after writing every row of the buffers in ``x_grads`` (one per entry of
    ``x_outputs``: the per-step inputs with a gradient) and adding into ``shared_grads`` (one per entry of
    ``shared_outputs``). ``run`` is ``None`` where the VJP graph cannot be written out (``reason``)."""

    run: Callable | None
    x_outputs: tuple[int, ...] = ()
    shared_outputs: tuple[int, ...] = ()
    source: str = ""
    reason: str = ""


_LOOPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def adjoint_loop_for(program, n_columns: int, n_shared: int) -> AdjointLoop:
    """The loop of ``program.step_vjp`` (generated at its first use, shared by the program's copies)."""
    loop = _LOOPS.get(program.step_vjp)
    if loop is None:
        try:
            loop = generate_adjoint_loop(program.step_vjp, n_columns, n_shared)
        except Exception as error:  # a graph the generator does not cover: the VJP graph is called per step
            loop = AdjointLoop(None, reason=brief(error))
            log.debug("seqpar: the sequential adjoint calls the step's VJP per step: %s", loop.reason)
        _LOOPS[program.step_vjp] = loop
    return loop


def generate_adjoint_loop(graph_module: fx.GraphModule, n_columns: int, n_shared: int) -> AdjointLoop:
    """``graph_module`` (placeholders ``s, x_0 .., shared_0 .., lam``; results ``(J^T lam, [dx_i], [dshared_j])``
    with ``None`` for inputs without a gradient) as the adjoint's loop function."""
    plan = StepPlan(graph_module, n_columns, n_shared, n_carried=1)
    results = plan.results
    if len(results) != 1 + n_columns + n_shared or not isinstance(results[0], fx.Node):
        raise ValueError("the step's VJP graph does not return (J^T lam, input gradients, shared gradients)")
    grad_state, grad_xs, grad_shared = results[0], results[1 : 1 + n_columns], results[1 + n_columns :]
    x_outputs = tuple(index for index, node in enumerate(grad_xs) if node is not None)
    shared_outputs = tuple(index for index, node in enumerate(grad_shared) if node is not None)
    before, body = plan.statements()
    name = plan.names
    lines = ["def adjoint(prev, columns, shared, grads, x_grads, shared_grads):", *plan.unpacking()]
    if x_outputs:
        lines.append("    " + "".join(f"gx{index}, " for index in x_outputs) + "= x_grads")
    if shared_outputs:
        lines.append("    " + "".join(f"gsh{index}, " for index in shared_outputs) + "= shared_grads")
    lines += ["    " + line for line in before]
    lines += ["    c0 = grads[-1]", "    for l in range(len(prev) - 1, -1, -1):", "        s = prev[l]"]
    lines += ["        " + line for line in plan.step_inputs("l")]
    lines += ["        " + line for line in body]
    lines += [f"        gx{index}[l].copy_({name[grad_xs[index]]})" for index in x_outputs]
    lines += [f"        gsh{index}.add_({name[grad_shared[index]]})" for index in shared_outputs]
    lines += ["        if l:", f"            c0 = _add(grads[l - 1], {name[grad_state]})",
              f"    return {name[grad_state]}"]
    source = "\n".join(lines) + "\n"
    namespace = dict(plan.constants, _add=torch.add)
    exec(compile(source, "<seqpar adjoint loop>", "exec"), namespace)
    return AdjointLoop(namespace["adjoint"], x_outputs, shared_outputs, source)
