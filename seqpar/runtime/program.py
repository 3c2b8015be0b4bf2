"""A chain's step function and its derivatives, traced once for one shape.

A chain is ``s_l = f(s_{l-1}, x_l, *shared)`` for ``l = 1..L``. The solver
works on packed states: every state (a tensor or a tuple of tensors whose
leading ``batch_ndim`` dims are batch dims) becomes a matrix of shape ``(N, w)``:
``N`` batch elements, ``w`` state values each. For ``L`` steps at once it needs

* ``F = f(prev, x)``                 all steps, ``prev`` of shape ``(L, N, w)``;
* ``J_l = d f(s_{l-1}, x_l) / d s``  per batch element, ``(L, N, w, w)``, or its
  true diagonal ``(L, N, w)``: ``w`` reverse-mode products ``e_k^T J`` whose
  cotangent ``e_k`` is broadcast over the batch (the step acts on batch
  elements independently, so row ``k`` of every block comes out at once);
* the vector-Jacobian products of all steps at once for the adjoint.

When the step is ``s -> h(s @ B, s)`` with one matrix product ``B`` (a
per-step or shared weight, not a function of ``s``) followed only by pointwise
operations ``h`` (an affine layer and an activation, optionally a residual
``s + ...``), the Jacobian is built from the exact formula

    J = diag(dh/dz) B^T + diag(dh/ds),     z = s @ B,

where the diagonals ``dh/dz``, ``dh/ds`` are vector-Jacobian products with a
cotangent of ones (exact, because ``h`` acts elementwise): one pass instead of
``w`` (:func:`find_affine_pointwise` recognises the pattern on the traced step
graph; every other step keeps the generic path).

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
from torch.func import vjp, vmap


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
    ``frozen`` names inputs that get no gradient (see :func:`_pullback`).
    ``structure`` is the :class:`AffinePointwise` form of the step when one was
    found, and ``jacobian_method`` says which Jacobian is used:
    ``"affine-pointwise"`` (the exact formula) or ``"generic"`` (``w`` VJPs,
    one per row of every block: reverse mode works for every op with a
    backward, where forward mode under ``make_fx`` fails for some, e.g.
    ``layer_norm`` or a state scaled by a Python float).
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
        frozen: frozenset = frozenset(),
    ):
        self.id = next(self._ids)
        self.frozen = frozen
        self.step = step
        self.layout = layout
        self.length = length
        self.xs_spec = xs_spec
        self.jacobian = jacobian
        self.adjoint = adjoint
        self.last_stats = None
        prev = torch.empty(length, layout.batch_size, layout.width, dtype=layout.dtype, device=layout.device)
        examples = (prev, list(xs_leaves), list(shared))
        self.structure = None
        if jacobian != "identity" or adjoint == "parallel":
            self.structure = find_affine_pointwise(self.step_packed, prev[0], [leaf[0] for leaf in xs_leaves], list(shared))
        self.jacobian_method = "generic" if self.structure is None else "affine-pointwise"
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

    def per_step_inputs(self, xs_leaves, start: int = 0) -> list:
        """``[x_start, ..., x_{L-1}]``: the step's input trees, sliced once (for the sequential loop)."""
        columns = [leaf[start:].unbind(0) for leaf in xs_leaves]
        rows = zip(*columns) if columns else [()] * (self.length - start)
        spec = self.xs_spec
        if spec.is_leaf():
            return [row[0] for row in rows]
        if spec.type in (tuple, list) and all(child.is_leaf() for child in spec.children()):
            return [spec.type(row) for row in rows]
        return [pytree.tree_unflatten(list(row), spec) for row in rows]

    def _steps(self, prev, xs_leaves, shared):
        """``F_l = f(prev_l, x_l)`` for all ``l``: ``(L, N, w) -> (L, N, w)``."""
        return vmap(self.step_packed, in_dims=(0, 0, None))(prev, xs_leaves, shared)

    def _make_steps_and_jacobians(self, kind: str):
        """``(F, J)`` of all steps; the affine-pointwise formula where :attr:`structure` was found."""
        width = self.layout.width
        if self.structure is not None:
            structure = self.structure

            def fast(prev, xs_leaves, shared):
                return vmap(lambda s, x, sh: structure.value_and_jacobian(s, x, sh, kind), in_dims=(0, 0, None))(
                    prev, xs_leaves, shared
                )

            return fast

        def per_step(s, x_leaves, shared):
            value, pullback = vjp(lambda s_: self.step_packed(s_, x_leaves, shared), s)
            basis = torch.eye(width, dtype=s.dtype, device=s.device).unsqueeze(1).expand(width, *s.shape)
            rows = vmap(lambda cotangent: pullback(cotangent)[0])(basis)  # rows[k, n, j] = J[n, k, j]
            if kind == "diag":
                return value, torch.diagonal(rows, dim1=0, dim2=2).contiguous()  # (N, w)
            return value, rows.transpose(0, 1).contiguous()  # (N, w_out, w_in)

        def steps_and_jacobians(prev, xs_leaves, shared):
            return vmap(per_step, in_dims=(0, 0, None))(prev, xs_leaves, shared)

        return steps_and_jacobians

    def _step_vjp(self, s, x_leaves, shared, cotangent):
        """Cotangents of one step: ``(J^T lam, d<lam, f>/dx, d<lam, f>/dshared)``."""
        return _pullback(self.step_packed, s, x_leaves, shared, cotangent, self.frozen)

    def _steps_vjp(self, prev, xs_leaves, shared, cotangent):
        """Cotangents of all steps at once: ``(J_l^T lam_l, d<lam_l, f_l>/dx_l, sum_l d<lam_l, f_l>/dshared)``."""
        return _pullback(self._steps, prev, xs_leaves, shared, cotangent, self.frozen)


def _pullback(fn, s, x_leaves, shared, cotangent, frozen=frozenset()):
    """VJP of ``fn(s, x_leaves, shared)`` w.r.t. ``s`` and every floating-point leaf.

    Integer leaves (timestep indices) and the leaves named in ``frozen``
    (``("xs", i)`` or ``("shared", i)``: buffers such as BatchNorm's running
    statistics, which some ops do not differentiate) get ``None``.
    """
    def differentiable(tensors, group):
        return [i for i, tensor in enumerate(tensors) if tensor.is_floating_point() and (group, i) not in frozen]

    x_float, shared_float = differentiable(x_leaves, "xs"), differentiable(shared, "shared")

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
    graph_module.graph.eliminate_dead_code()
    graph_module.recompile()
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


_aten = torch.ops.aten
_LINEAR_OPS = (_aten.mm.default, _aten.addmm.default)
# Reshapes that keep the elements' flat order: element i of the input is element i of the output.
_FLAT_VIEWS = (
    _aten.view.default,
    _aten._unsafe_view.default,
    _aten.reshape.default,
    _aten.alias.default,
    _aten.unsqueeze.default,
    _aten.squeeze.dim,
    _aten.squeeze.dims,
    _aten.squeeze.default,
    _aten.clone.default,
)


def _is_pointwise(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


@dataclass
class AffinePointwise:
    """A step of the form ``f(s) = h(s @ B, s)`` with ``h`` elementwise in both arguments.

    ``graph`` is the step traced on one packed state ``(N, w)``; ``linear`` the
    ``mm``/``addmm`` node ``z = s @ B (+ bias)``; ``weight`` its ``B`` operand
    ``(w, w)``; ``direct``: whether ``h`` also reads ``s`` itself (a residual).
    """

    graph: torch.fx.GraphModule
    linear: torch.fx.Node
    weight: torch.fx.Node
    output: torch.fx.Node
    direct: bool

    def _run(self, flat_args, replace=None):
        """Evaluate the traced step; ``replace`` maps nodes to given values (their inputs are not used)."""
        env = {}
        args = iter(flat_args)
        for node in self.graph.graph.nodes:
            if node.op == "placeholder":
                env[node] = next(args)
            elif node.op == "output":
                break
            elif replace is not None and node in replace:
                env[node] = replace[node]
            elif node.op == "get_attr":
                env[node] = getattr(self.graph, node.target)
            else:
                call_args = torch.fx.node.map_arg(node.args, env.__getitem__)
                call_kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
                env[node] = node.target(*call_args, **call_kwargs)
        return env

    def value_and_jacobian(self, s, x_leaves, shared, kind: str):
        """``(f(s), J)`` for one step: ``J`` is ``(N, w, w)`` (``"full"``) or its diagonal ``(N, w)``.

        ``J = diag(g_z) B^T + diag(g_s)`` with ``g_z = (dh/dz)^T 1`` and ``g_s = (dh/ds)^T 1``
        (exact: both are diagonal).
        """
        rest = [*x_leaves, *shared]
        env = self._run([s, *rest])
        z, weight = env[self.linear], env[self.weight]

        def tail(z_, s_):
            return self._run([s_, *rest], replace={self.linear: z_})[self.output]

        # h is elementwise, so its Jacobians are diagonal: a VJP with ones reads the diagonal.
        value, pull_z = vjp(lambda z_: tail(z_, s), z)
        grad_z = pull_z(torch.ones_like(value))[0].reshape(s.shape)
        grad_s = None
        if self.direct:
            _, pull_s = vjp(lambda s_: tail(z, s_), s)
            grad_s = pull_s(torch.ones_like(value))[0].reshape(s.shape)
        value = value.reshape(s.shape)
        if kind == "diag":
            diagonal = grad_z * torch.diagonal(weight)
            return value, diagonal if grad_s is None else diagonal + grad_s
        jacobian = grad_z.unsqueeze(-1) * weight.transpose(0, 1)
        if grad_s is not None:
            jacobian = jacobian + torch.diag_embed(grad_s)
        return value, jacobian


def find_affine_pointwise(step_packed, s, x_leaves, shared) -> AffinePointwise | None:
    """Recognise ``f(s) = h(s @ B, s)`` (one matrix product, then elementwise ops) on the traced step.

    ``step_packed(s, x_leaves, shared)`` maps a packed state ``(N, w)`` to the
    next. Returns ``None`` (use the generic Jacobian) unless: the state reaches
    exactly one ``mm``/``addmm`` node, as its first operand, through reshapes
    that keep the flat order, with shape ``(N, w)``; the other operand ``B``
    (``(w, w)``) and any bias do not depend on the state; and every other node
    that depends on the state is a flat-order reshape or a pointwise op whose
    state-dependent inputs have as many elements as its output, ending in the
    single ``(N, w)`` output.
    """
    try:
        graph_module = make_fx(lambda *args: step_packed(*args), tracing_mode="fake")(s, list(x_leaves), list(shared))
    except Exception:
        return None
    graph_module.graph.eliminate_dead_code()
    nodes = list(graph_module.graph.nodes)
    placeholders = [node for node in nodes if node.op == "placeholder"]
    (output_node,) = [node for node in nodes if node.op == "output"]
    outputs = pytree.tree_leaves(output_node.args[0])
    if not placeholders or len(outputs) != 1 or not isinstance(outputs[0], torch.fx.Node):
        return None
    state = placeholders[0]
    (result,) = outputs
    dependent = {state}
    for node in nodes:
        if node.op == "call_function" and any(arg in dependent for arg in node.all_input_nodes):
            dependent.add(node)
    linear = [node for node in dependent if node.target in _LINEAR_OPS]
    if len(linear) != 1 or result not in dependent:
        return None
    (linear,) = linear
    if linear.kwargs:  # addmm's beta / alpha
        return None
    *bias, operand, weight = linear.args
    if operand not in dependent or weight in dependent or any(b in dependent for b in bias):
        return None

    def shape(node):
        value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    rows, width = s.shape
    if shape(operand) != (rows, width) or shape(weight) != (width, width) or shape(linear) != (rows, width):
        return None
    head = set()  # the state and its reshapes leading to the product
    frontier = [operand]
    while frontier:
        node = frontier.pop()
        if node in head:
            continue
        if node is not state and node.target not in _FLAT_VIEWS:
            return None
        head.add(node)
        frontier.extend(arg for arg in node.all_input_nodes if arg in dependent)
    if state not in head:
        return None
    numel = rows * width
    direct = False
    for node in dependent - head - {linear}:
        if node.target not in _FLAT_VIEWS and not _is_pointwise(node.target):
            return None
        node_shape = shape(node)
        if node_shape is None or math.prod(node_shape) != numel:
            return None
        for arg in node.all_input_nodes:
            if arg in dependent:
                arg_shape = shape(arg)
                if arg_shape is None or math.prod(arg_shape) != numel:
                    return None
                direct = direct or arg in head
        if node.target in _FLAT_VIEWS and any(arg in dependent for arg in node.args[1:] if isinstance(arg, torch.fx.Node)):
            return None
    if shape(result) is None or math.prod(shape(result)) != numel:
        return None
    if result in head:  # the output is the state itself plus nothing through the product
        return None
    return AffinePointwise(graph_module, linear, weight, result, direct)
