"""A chain's step function and its derivatives, traced once for one shape.

A chain is ``s_l = f(s_{l-1}, x_l, *shared)`` for ``l = 1..L``. The solver
works on packed states: every state (a tensor or a tuple of tensors whose
leading ``batch_ndim`` dims are batch dims) becomes a matrix of shape ``(N, w)``:
``N`` batch elements, ``w`` state values each. For ``L`` steps at once it needs

* ``F = f(prev, x)``                 all steps, ``prev`` of shape ``(L, N, w)``;
* ``J_l = d f(s_{l-1}, x_l) / d s``  per batch element, ``(L, N, w, w)``, or its
  true diagonal ``(L, N, w)``: ``w`` forward-mode products ``J e_k`` whose
  tangent ``e_k`` is broadcast over the batch (the step acts on batch elements
  independently, so column ``k`` of every block comes out at once);
* the vector-Jacobian products of all steps at once for the adjoint.

``torch.func`` transforms cannot run inside a custom op under aot_autograd's
first-call analysis (torch 2.13), so these functions are traced with
``make_fx`` when the program is built and the runtime calls plain aten graphs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch.fx.experimental.proxy_tensor import make_fx
from torch.func import jvp, vjp, vmap


@dataclass(frozen=True)
class StateLayout:
    """How a (tuple of) state tensor(s) packs into an ``(N, w)`` matrix."""

    spec: pytree.TreeSpec
    batch_shape: torch.Size
    leaf_shapes: tuple[torch.Size, ...]  # per leaf, without the batch dims
    dtype: torch.dtype
    device: torch.device

    @property
    def batch_size(self) -> int:
        return math.prod(self.batch_shape)

    @property
    def width(self) -> int:
        return sum(math.prod(shape) for shape in self.leaf_shapes)

    def pack(self, state: Any) -> torch.Tensor:
        """State tree with leading dims ``(*lead, *batch)`` -> ``(*lead, N, w)``."""
        leaves = pytree.tree_leaves(state)
        lead = leaves[0].shape[: leaves[0].ndim - len(self.leaf_shapes[0]) - len(self.batch_shape)]
        flat = [leaf.reshape(*lead, self.batch_size, -1) for leaf in leaves]
        return flat[0] if len(flat) == 1 else torch.cat(flat, dim=-1)

    def unpack(self, packed: torch.Tensor) -> Any:
        """``(*lead, N, w)`` -> state tree with leading dims ``(*lead, *batch)``."""
        lead = packed.shape[:-2]
        sizes = [math.prod(shape) for shape in self.leaf_shapes]
        parts = packed.split(sizes, dim=-1) if len(sizes) > 1 else (packed,)
        leaves = [
            part.reshape(*lead, *self.batch_shape, *shape)
            for part, shape in zip(parts, self.leaf_shapes)
        ]
        return pytree.tree_unflatten(leaves, self.spec)


class ChainProgram:
    """Traced forward, Jacobian and VJP functions of one chain's step.

    ``step(s_prev, x_l, *shared) -> s_l`` must be pure: every tensor it reads
    is its state, its per-step input or a shared tensor. ``xs_leaves`` are the
    per-step inputs flattened (each stacked on dim 0, length ``L``).
    """

    _ids = itertools.count()

    def __init__(
        self,
        step: Callable,
        layout: StateLayout,
        length: int,
        xs_spec: pytree.TreeSpec,
        xs_leaves: list[torch.Tensor],
        shared: list[torch.Tensor],
        jacobian: str,
        adjoint: str,
    ):
        self.id = next(self._ids)
        self.step = step
        self.layout = layout
        self.length = length
        self.xs_spec = xs_spec
        self.jacobian = jacobian
        self.adjoint = adjoint
        self.last_stats = None
        prev = torch.empty(length, layout.batch_size, layout.width, dtype=layout.dtype, device=layout.device)
        examples = (prev, list(xs_leaves), list(shared))
        self.steps_at = _trace(self._steps, *examples)
        self.steps_and_jacobians = (
            None if jacobian == "identity" else _trace(self._make_steps_and_jacobians(jacobian), *examples)
        )
        if adjoint == "parallel":
            self.full_jacobians = (
                self.steps_and_jacobians
                if jacobian == "full"
                else _trace(self._make_steps_and_jacobians("full"), *examples)
            )
            self.steps_vjp = _trace(self._steps_vjp, *examples, torch.empty_like(prev))
        else:
            one = (prev[0], [leaf[0] for leaf in xs_leaves], list(shared))
            self.step_vjp = _trace(self._step_vjp, *one, torch.empty_like(prev[0]))

    def step_packed(self, s: torch.Tensor, x_leaves, shared) -> torch.Tensor:
        """One step on a packed state ``(N, w)``: ``pack(f(unpack(s), x_l, *shared))``."""
        x = pytree.tree_unflatten(list(x_leaves), self.xs_spec)
        return self.layout.pack(self.step(self.layout.unpack(s), x, *shared))

    def step_sequential(self, index: int, s: torch.Tensor, xs_leaves, shared) -> torch.Tensor:
        """Step ``index`` (0-based) of the chain, evaluated on its own."""
        return self.step_packed(s, [leaf[index] for leaf in xs_leaves], shared)

    def _steps(self, prev, xs_leaves, shared):
        """``F_l = f(prev_l, x_l)`` for all ``l``: ``(L, N, w) -> (L, N, w)``."""
        return vmap(self.step_packed, in_dims=(0, 0, None))(prev, xs_leaves, shared)

    def _make_steps_and_jacobians(self, kind: str):
        width = self.layout.width

        def per_step(s, x_leaves, shared):
            def step_of_state(s_):
                return self.step_packed(s_, x_leaves, shared)

            def directional(tangent):
                return jvp(step_of_state, (s,), (tangent,))[1]

            basis = torch.eye(width, dtype=s.dtype, device=s.device).unsqueeze(1).expand(width, *s.shape)
            value = step_of_state(s)
            columns = vmap(directional)(basis)  # columns[k, n, i] = J[n, i, k]
            if kind == "diag":
                return value, torch.diagonal(columns, dim1=0, dim2=2).contiguous()  # (N, w)
            return value, columns.permute(1, 2, 0).contiguous()  # (N, w_out, w_in)

        def steps_and_jacobians(prev, xs_leaves, shared):
            return vmap(per_step, in_dims=(0, 0, None))(prev, xs_leaves, shared)

        return steps_and_jacobians

    def _step_vjp(self, s, x_leaves, shared, cotangent):
        """Cotangents of one step: ``(J^T lam, d<lam, f>/dx, d<lam, f>/dshared)``."""
        return _pullback(self.step_packed, s, x_leaves, shared, cotangent)

    def _steps_vjp(self, prev, xs_leaves, shared, cotangent):
        """Cotangents of all steps at once: ``(J_l^T lam_l, d<lam_l, f_l>/dx_l, sum_l d<lam_l, f_l>/dshared)``."""
        return _pullback(self._steps, prev, xs_leaves, shared, cotangent)


def _pullback(fn, s, x_leaves, shared, cotangent):
    """VJP of ``fn(s, x_leaves, shared)`` w.r.t. ``s`` and every floating-point leaf.

    Integer leaves (timestep indices) get ``None``.
    """
    def differentiable(tensors):
        return [index for index, tensor in enumerate(tensors) if tensor.is_floating_point()]

    x_float, shared_float = differentiable(x_leaves), differentiable(shared)

    def of_floats(s_, x_part, shared_part):
        x_all, shared_all = list(x_leaves), list(shared)
        for index, tensor in zip(x_float, x_part):
            x_all[index] = tensor
        for index, tensor in zip(shared_float, shared_part):
            shared_all[index] = tensor
        return fn(s_, x_all, shared_all)

    _, pullback = vjp(of_floats, s, [x_leaves[i] for i in x_float], [shared[i] for i in shared_float])
    grad_s, grad_x_part, grad_shared_part = pullback(cotangent)
    grad_x, grad_shared = [None] * len(x_leaves), [None] * len(shared)
    for index, grad in zip(x_float, grad_x_part):
        grad_x[index] = grad
    for index, grad in zip(shared_float, grad_shared_part):
        grad_shared[index] = grad
    return grad_s, grad_x, grad_shared


def _trace(fn, *example_args):
    """make_fx-trace ``fn`` on fake copies of ``example_args``.

    A step that closes over a tensor would have its value frozen into the trace;
    only one-element literals (``torch.tensor(0.5)``) may be closed over.
    """
    graph_module = make_fx(lambda *args: fn(*args), tracing_mode="fake")(*example_args)
    constants = [
        node.target
        for node in graph_module.graph.nodes
        if node.op == "get_attr" and getattr(graph_module, node.target).numel() > 1
    ]
    if constants:
        raise ValueError(
            "step reads tensors that are not its arguments (closed-over tensors: "
            f"{', '.join(map(str, constants))}); pass them through xs (per step) or shared"
        )
    return graph_module
