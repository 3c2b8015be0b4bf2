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
* or an estimate of ``J_l`` from one reverse-mode product (``"estimate"``,
  :func:`rayleigh_estimate`: ``c_l I`` per batch element, solved as a diagonal);
* the vector-Jacobian products of all steps at once for the adjoint.

What the step's Jacobian is, is proven from the traced step graph
(:mod:`seqpar.runtime.structure`, :attr:`ChainProgram.step_structure`). A
*diagonal* step (every state value updated from itself alone: elementwise
gates, Mamba's selective scan) has ``J = diag(J^T 1)``: its blocks, ``(L, N,
w)``, are one vector-Jacobian product with a cotangent of ones per position,
exact, at any width, and a request for full Jacobians is served by them (the
diagonal is the whole Jacobian). An *affine* step (``f(s) = A_l s + c_l``)
with exact blocks is solved by one linear solve
(:func:`seqpar.runtime.newton.linear_solve`).

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
Before any transform sees it the step is lowered to functional aten ops on one
position (:func:`lower_step`): vmap then batches only aten ops, never a
composite op's decomposition (some ask questions a batched tensor cannot
answer, e.g. ``group_norm`` on a channels-last-strided input).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import types
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch.func import functionalize, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .spec import FORWARD_CHOICES, LOOP_CHOICES, forward_block_kind
from .maxplus import slope_graph
from .structure import FLAT_VIEWS, acts_elementwise, node_shape, state_dependent, step_structure
from .tracing import make_fx

# A program's run spec: how it runs, as opposed to what its traces compute.
RUN_FIELDS = ("solver_options", "method", "sequential_reason", "loop", "param_slots")


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
        flat = [leaf.reshape(*lead, self.batch_size, math.prod(shape)) for leaf, shape in zip(leaves, self.leaf_shapes)]
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
    ``lowered``: the packed step already lowered (:func:`lower_packed_step`),
    shared with other programs of the same step and shapes; lowered here
    when ``None``.

    ``step_structure`` is the :class:`~seqpar.runtime.structure.StepStructure`
    proven from the lowered graph (diagonal, affine). ``structure`` is the
    :class:`AffinePointwise` form of the step when one was found, and
    ``jacobian_method`` says which Jacobian is used: ``"diagonal"`` (a
    diagonal step: ``J^T 1``, one VJP), ``"affine-pointwise"`` (the exact
    formula) or ``"generic"`` (``w`` VJPs, one per row of every block: reverse
    mode works for every op with a backward, where forward mode under
    ``make_fx`` fails for some, e.g. ``layer_norm`` or a state scaled by a
    Python float). ``solve_kind`` is the forward's PCR blocks (``"diag"`` for
    a diagonal step's ``"full"`` Jacobians and for ``"estimate"``),
    ``adjoint_kind`` the adjoint's (``"diag"`` for a diagonal step, else
    ``"full"``); ``one_linear_solve`` says the chain is solved by one linear
    solve (an affine step whose blocks are its exact Jacobian),
    ``one_maxplus_solve`` by one max-plus pass (a max-plus step,
    :mod:`seqpar.runtime.maxplus`, whose slopes ``maxplus_slopes`` gives at
    all positions).

    ``outputs``, where the chain has per-step outputs, is
    ``g(s_prev, x_l, *shared) -> (y^1_l, .., y^J_l)``: tensors each step
    computes besides its state (``outputs_at_next``: ``g`` takes the step's
    result ``s_l`` instead of ``s_{l-1}``). They are evaluated for all steps at once at
    the solved states (:attr:`outputs_at`: ``Y^j = (y^j_1, .., y^j_L)``, shapes
    :attr:`output_shapes`) and differentiated the same way
    (:attr:`outputs_vjp`); never by a second sequential pass.

    How the program runs (its *run spec*, :data:`RUN_FIELDS`) is fixed at
    construction like everything else: ``solver_options`` (the
    ``newton_solve`` keywords, read-only), ``method`` (the forward:
    ``"parallel"`` or ``"sequential"``, the plain loop recorded with
    ``sequential_reason``), ``loop`` (how a sequential forward runs,
    :data:`~seqpar.runtime.spec.LOOP_CHOICES`) and ``param_slots`` (the
    per-step inputs the op receives as unstacked layer parameters). A program
    is never written to after construction; :meth:`replace` makes a program
    with another run spec (and its own ``id``) that shares the traces. What
    calls leave behind lives in :func:`seqpar.runtime.ops.call_state`.
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
        lowered: torch.fx.GraphModule | None = None,
        outputs: Callable | None = None,
        outputs_at_next: bool = False,
        **run,
    ):
        self._set_run(**run)
        self.id = next(self._ids)
        self.frozen = frozen
        self.outputs = outputs
        self.outputs_at_next = outputs_at_next
        self.step = step
        self.step_packed = packed_step(step, layout, xs_spec)
        self.layout = layout
        self.length = length
        self.xs_spec = xs_spec
        self.jacobian = jacobian
        self.adjoint = adjoint
        prev = torch.empty(length, layout.batch_size, layout.width, dtype=layout.dtype, device=layout.device)
        examples = (prev, list(xs_leaves), list(shared))
        one = (prev[0], [leaf[0] for leaf in xs_leaves], list(shared))
        if lowered is None:
            lowered = lower_packed_step(step, layout, xs_spec, xs_leaves, shared)
        self.lowered = lowered
        self.step_structure = step_structure(self.lowered)
        diagonal = self.step_structure.diagonal
        self.solve_kind = forward_block_kind(jacobian, diagonal)
        self.adjoint_kind = "diag" if diagonal else "full"
        exact = jacobian == "full" or (diagonal and jacobian == "diag")  # the blocks are the Jacobian itself
        self.one_linear_solve = self.step_structure.affine and exact
        self.one_maxplus_solve = self.step_structure.maxplus and exact
        self.structure = None
        if not diagonal and (jacobian in ("full", "diag") or adjoint == "parallel"):
            self.structure = find_affine_pointwise(self.lowered)
        self.jacobian_method = "generic" if self.structure is None else "affine-pointwise"
        if jacobian == "estimate":
            self.jacobian_method = "estimate"
        elif diagonal:
            self.jacobian_method = "diagonal"
        # (f(s), J^T c) at one position, lowered: vmap batches it over cotangents (Jacobian rows, probes);
        # a diagonal step's cotangent is ones.
        generic_rows = self.structure is None and (jacobian != "identity" or adjoint == "parallel")
        needs_vjp = jacobian == "estimate" or generic_rows
        self.lowered_state_vjp = lower_step(self._state_vjp, *one, torch.empty_like(prev[0])) if needs_vjp else None
        self.steps_at = _trace(self._steps, *examples)
        self.maxplus_slopes = (
            _trace(_at_every_position(slope_graph(self.lowered)), *examples) if self.one_maxplus_solve else None
        )
        self.steps_and_jacobians = (
            None if jacobian == "identity" else _trace(self._make_steps_and_jacobians(jacobian), *examples)
        )
        if adjoint == "parallel":
            self.full_jacobians = (
                self.steps_and_jacobians if exact else _trace(self._make_steps_and_jacobians("full"), *examples)
            )
            self.steps_vjp = _trace(self._steps_vjp, *examples, torch.empty_like(prev))
        else:
            # lowered: the layout-checked kernels of its backward (group norm) get contiguous inputs
            self.step_vjp = lower_step(self._step_vjp, *one, torch.empty_like(prev[0]))
        self.outputs_at = self.outputs_vjp = None
        self.output_shapes, self.differentiable_outputs = (), ()
        if outputs is not None:
            self.lowered_outputs = lower_step(self.outputs_packed, *one)
            self.outputs_at = _trace(self.outputs_batched, *examples)
            (results,) = [node.args[0] for node in self.outputs_at.graph.nodes if node.op == "output"]
            self.output_shapes = tuple((tuple(node.meta["val"].shape), node.meta["val"].dtype) for node in results)
            self.differentiable_outputs = tuple(
                index for index, (_, dtype) in enumerate(self.output_shapes) if dtype.is_floating_point
            )
            cotangents = [torch.empty(shape, dtype=dtype, device=layout.device) for shape, dtype in self.output_shapes]
            if self.differentiable_outputs:
                self.outputs_vjp = _trace(self._outputs_vjp, *examples, cotangents)
        self._built = True

    def __setattr__(self, name, value):
        if getattr(self, "_built", False):
            raise AttributeError(
                f"ChainProgram is immutable after construction (setting {name!r}); program.replace(...) makes a "
                "program with another run spec, per-call state lives in seqpar.runtime.ops.call_state"
            )
        object.__setattr__(self, name, value)

    @property
    def run(self) -> dict:
        """The run spec: ``{name: value}`` for :data:`RUN_FIELDS`."""
        return {name: getattr(self, name) for name in RUN_FIELDS}

    def replace(self, **run) -> "ChainProgram":
        """A program with the same traces and the run spec updated by ``run`` (a new ``id``, not registered)."""
        copy = object.__new__(ChainProgram)
        copy.__dict__.update(self.__dict__)
        object.__setattr__(copy, "_built", False)
        copy._set_run(**{**self.run, **run})
        copy.id = next(self._ids)
        copy._built = True
        return copy

    def _set_run(
        self,
        solver_options=None,
        method: str = "parallel",
        sequential_reason: str = "",
        loop: str = "exact",
        param_slots=(),
    ):
        """Validate and set the run spec (see the class docstring)."""
        if method not in FORWARD_CHOICES:
            raise ValueError(f"method must be one of {FORWARD_CHOICES}, got {method!r}")
        if loop not in LOOP_CHOICES:
            raise ValueError(f"loop must be one of {LOOP_CHOICES}, got {loop!r}")
        self.solver_options = types.MappingProxyType(dict(solver_options or {}))
        self.method = method
        self.sequential_reason = sequential_reason
        self.loop = loop
        self.param_slots = tuple(param_slots)

    def output_states(self, s0: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The states ``g`` is evaluated at, ``(K, N, w)``, for the steps whose results are ``states`` and that
        start from ``s0``: those results ``(s_1, .., s_K)`` where the outputs read them (``outputs_at_next``),
        else every step's input ``(s_0, .., s_{K-1})``."""
        return states if self.outputs_at_next else torch.cat([s0.unsqueeze(0), states[:-1]])

    def outputs_packed(self, s: torch.Tensor, x_leaves, shared) -> tuple:
        """One step's per-step outputs on a packed state ``(N, w)``: ``g(unpack(s), x_l, *shared)``."""
        x = pytree.tree_unflatten(list(x_leaves), self.xs_spec)
        return tuple(self.outputs(self.layout.unpack(s), x, *shared))

    def outputs_batched(self, prev, xs_leaves, shared):
        """``Y^j_l = g^j(prev_l, x_l)`` for all ``l`` given: ``(K, N, w) -> ((K, *y^j shape), ..)``, any ``K``
        (:attr:`outputs_at` is this traced at ``K = L``)."""
        return vmap(self.lowered_outputs, in_dims=(0, 0, None))(prev, xs_leaves, shared)

    def _outputs_vjp(self, prev, xs_leaves, shared, cotangents):
        """Cotangents of the per-step outputs: ``(sum_j dg^j_l/ds^T c^j_l, d<c, g>/dx_l, sum_l d<c_l, g_l>/dshared)``
        over the floating-point outputs (:attr:`differentiable_outputs`; an index or a mask has no derivative)."""
        chosen = self.differentiable_outputs

        def differentiable(prev, xs_leaves, shared):
            outputs = self.outputs_batched(prev, xs_leaves, shared)
            return tuple(outputs[index] for index in chosen)

        return _pullback(differentiable, prev, xs_leaves, shared, tuple(cotangents[index] for index in chosen),
                         self.frozen)

    def input_trees(self, xs_leaves, start: int = 0, stop: int | None = None) -> list:
        """``[x_start, ..., x_{stop-1}]`` (``stop``: default ``L``): the step's input trees, sliced once (for the
        sequential loop)."""
        stop = self.length if stop is None else stop
        columns = [leaf[start:stop].unbind(0) for leaf in xs_leaves]
        rows = zip(*columns) if columns else [()] * (stop - start)
        spec = self.xs_spec
        if spec.is_leaf():
            return [row[0] for row in rows]
        if spec.type in (tuple, list) and all(child.is_leaf() for child in spec.children()):
            return [spec.type(row) for row in rows]
        return [pytree.tree_unflatten(list(row), spec) for row in rows]

    def _steps(self, prev, xs_leaves, shared):
        """``F_l = f(prev_l, x_l)`` for all ``l``: ``(L, N, w) -> (L, N, w)``."""
        return _at_every_position(self.lowered)(prev, xs_leaves, shared)

    def _state_vjp(self, s, x_leaves, shared, cotangent):
        """``(f(s), J^T c)`` at one position: ``s`` and ``c`` of shape ``(N, w)``."""
        value, pullback = vjp(lambda s_: self.step_packed(s_, x_leaves, shared), s)
        return value, pullback(cotangent)[0]

    def _make_steps_and_jacobians(self, kind: str):
        """``(F, A)`` of all steps: ``A`` the Jacobian blocks of ``kind`` (see :data:`seqpar.runtime.spec.JACOBIAN_ESTIMATES`).

        ``"full"``: ``J`` ``(L, N, w, w)``; ``"diag"``: its diagonal ``(L, N, w)``,
        by the affine-pointwise formula where :attr:`structure` was found, else
        from ``w`` VJPs; for a diagonal step (:attr:`step_structure`) both are
        ``diag J = J^T 1`` ``(L, N, w)``, one VJP with a cotangent of ones
        (exact: ``J`` is its diagonal); ``"estimate"``:
        :func:`rayleigh_estimate`, one VJP.
        """
        width = self.layout.width
        if kind == "estimate":

            def estimated(s, x_leaves, shared):
                return rayleigh_estimate(lambda c: self.lowered_state_vjp(s, x_leaves, shared, c), s)

            return _at_every_position(estimated)
        if self.step_structure.diagonal:
            return _at_every_position(lambda s, x, sh: self.lowered_state_vjp(s, x, sh, torch.ones_like(s)))
        if self.structure is not None:
            structure = self.structure
            return _at_every_position(lambda s, x, sh: structure.value_and_jacobian(s, x, sh, kind))

        def per_step(s, x_leaves, shared):
            basis = torch.eye(width, dtype=s.dtype, device=s.device).unsqueeze(1).expand(width, *s.shape)
            # rows[k, n, j] = J[n, k, j]; the value does not depend on the cotangent (values[k] are views of one).
            values, rows = vmap(lambda cotangent: self.lowered_state_vjp(s, x_leaves, shared, cotangent))(basis)
            value = values[0]
            if kind == "diag":
                return value, torch.diagonal(rows, dim1=0, dim2=2).contiguous()  # (N, w)
            return value, rows.transpose(0, 1).contiguous()  # (N, w_out, w_in)

        return _at_every_position(per_step)

    def _step_vjp(self, s, x_leaves, shared, cotangent):
        """Cotangents of one step: ``(J^T lam, d<lam, f>/dx, d<lam, f>/dshared)``."""
        return _pullback(self.step_packed, s, x_leaves, shared, cotangent, self.frozen)

    def _steps_vjp(self, prev, xs_leaves, shared, cotangent):
        """Cotangents of all steps at once: ``(J_l^T lam_l, d<lam_l, f_l>/dx_l, sum_l d<lam_l, f_l>/dshared)``."""
        return _pullback(self._steps, prev, xs_leaves, shared, cotangent, self.frozen)


def rayleigh_estimate(state_vjp, s):
    """``(f(s), A)`` with ``A = c 1^T`` ``(N, w)``: the Jacobian estimated as ``c I`` per batch element.

    ``state_vjp(v)`` returns ``(f(s), J^T v)`` for a cotangent ``v`` of shape
    ``(N, w)``. With one sign probe ``v in {-1, +1}^w`` (the same for every
    element and step, :func:`sign_probe`)

        c = <v, J v> / <v, v> = <J^T v, v> / w,

    the Rayleigh quotient of ``J`` along ``v``: one reverse-mode product per
    step, where the true diagonal costs ``w``. Over random signs its mean is
    ``tr(J) / w`` and its spread ``sqrt(2 sum_{j != k} J_jk^2) / w`` (Hutchinson),
    so it is exact for ``J = c I`` and close for a step that is a scaling plus
    a small or incoherent rest: a denoising step ``x -> a x + b eps(x)`` whose
    noise prediction is near ``sqrt(1 - abar) x``. Used as the diagonal
    ``A_l`` of the quasi-Newton linearisation (the "diag" PCR solve).
    """
    probe = sign_probe(s.shape[-1], s.dtype, s.device).expand(s.shape)
    value, pulled = state_vjp(probe)
    scale = (pulled * probe).mean(dim=-1, keepdim=True)  # <J^T v, v> / w: |v_k| = 1
    return value, scale.expand(s.shape).contiguous()


def _at_every_position(per_position):
    """``(prev (L, N, w), xs_leaves (L, ...), shared) -> per_position`` at every ``l``, batched by ``vmap``."""
    return lambda prev, xs_leaves, shared: vmap(per_position, in_dims=(0, 0, None))(prev, xs_leaves, shared)


def packed_step(step, layout: StateLayout, xs_spec: pytree.TreeSpec) -> Callable:
    """``(s, x_leaves, shared) -> pack(step(unpack(s), x_l, *shared))``: one step on a packed state ``(N, w)``."""

    def step_packed(s: torch.Tensor, x_leaves, shared) -> torch.Tensor:
        x = pytree.tree_unflatten(list(x_leaves), xs_spec)
        return layout.pack(step(layout.unpack(s), x, *shared))

    return step_packed


def lower_packed_step(step, layout: StateLayout, xs_spec, xs_leaves, shared) -> torch.fx.GraphModule:
    """The packed step (:func:`packed_step`) lowered at one position (:func:`lower_step`): ``xs_leaves`` stacked
    on dim 0 (row 0 is the example), ``shared`` as they are; what :attr:`ChainProgram.lowered` is."""
    state = torch.empty(layout.batch_size, layout.width, dtype=layout.dtype, device=layout.device)
    return lower_step(packed_step(step, layout, xs_spec), state, [leaf[0] for leaf in xs_leaves], list(shared))


def sign_probe(width: int, dtype, device) -> torch.Tensor:
    """A fixed pseudo-random sign vector ``(w,)``, computed in the graph (no tensor constant).

    ``v_k`` is a bit of an integer hash of ``k`` (two rounds of
    ``x -> (x ^ (x >> 16)) * 0x45d9f3b mod 2^32``): signs balanced and
    uncorrelated with the state's layout (an alternating or blocked pattern
    would correlate with a convolution's structure).
    """
    index = torch.arange(1, width + 1, dtype=torch.int64, device=device)
    for _ in range(2):
        index = torch.remainder((index ^ (index >> 16)) * 0x45D9F3B, 2**32)
    index = index ^ (index >> 16)
    return (1 - 2 * ((index >> 15) & 1)).to(dtype)


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


_VIEWS_TO_RESHAPE = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)
# Kernels that check their inputs' layout (torch 2.13: ``TORCH_CHECK(X.is_contiguous(
# X.suggest_memory_format()))``) -> the positions of the inputs checked.
_LAYOUT_CHECKED = {
    torch.ops.aten.native_group_norm.default: (0,),
    torch.ops.aten.native_group_norm_backward.default: (0, 1),
}


def lower_step(fn, *example_args) -> torch.fx.GraphModule:
    """``fn`` (the packed step, or its VJP) as a graph of functional aten ops, traced on one position.

    Called like ``fn`` (same pytree arguments: ``lowered(s, x_leaves,
    shared)`` for the step); the transforms (``vmap`` over positions and
    cotangents, ``vjp``) then act on aten ops only:

    * Composite ops are decomposed here, on plain tensors. Under ``vmap`` a
      decomposition runs on batched tensors, and some ask what a batched tensor
      cannot answer: ``group_norm`` calls ``input.contiguous(
      input.suggest_memory_format())``, which raises "NYI: querying
      is_contiguous inside of vmap for memory_format other than
      torch.contiguous_format" (torch 2.13) when the input is channels-last
      strided, as diffusers' attention output ``x.transpose(-1, -2).reshape(B,
      C, H, W)`` is; the lowered graph has ``native_group_norm``, which batches.
    * ``view`` / ``_unsafe_view`` become ``reshape``: whether a view is possible
      depends on strides, and a batched tensor's strides are the batching
      rules' choice, not those of the one position traced here. ``reshape`` is
      a view where possible and a copy otherwise; the values are the same, and
      after functionalization (mutations turned into out-of-place ops) no
      aliasing is observable.
    * On a CPU ``scaled_dot_product_attention`` takes its math backend
      (matmul, softmax: ops that batch, differentiated through them), not the
      fused CPU kernel, which has no batching rule (vmap would loop over the
      positions). A decomposition table would not do: it replaces the fused
      forward below autograd, whose backward formula then reads the
      decomposition's outputs as the kernel's (attention weights for its
      logsumexp: wrong gradients).
    * Inputs of kernels that check their layout (``_LAYOUT_CHECKED``:
      ``native_group_norm`` and its backward) are copied to the contiguous
      format first: a batching rule hands them a view of the batched tensor
      whose layout can differ from the traced one (e.g. channels-last strides
      on size-1 dims at a window of one position), and the kernel would raise.
    """
    tensors = [leaf for leaf in pytree.tree_leaves(example_args) if isinstance(leaf, torch.Tensor)]
    on_cpu = all(tensor.device.type == "cpu" for tensor in tensors)
    with sdpa_kernel(SDPBackend.MATH) if on_cpu else contextlib.nullcontext():
        graph_module = make_fx(functionalize(lambda *args: fn(*args), remove="mutations"), tracing_mode="fake")(
            *example_args
        )
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _VIEWS_TO_RESHAPE:
            node.target = torch.ops.aten.reshape.default
        for index in _LAYOUT_CHECKED.get(node.target, ()):
            with graph.inserting_before(node):
                copy = graph.call_function(
                    torch.ops.aten.clone.default, (node.args[index],), {"memory_format": torch.contiguous_format}
                )
            node.update_arg(index, copy)
    graph_module.graph.eliminate_dead_code()
    graph_module.recompile()
    return graph_module


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


def find_affine_pointwise(graph_module: torch.fx.GraphModule) -> AffinePointwise | None:
    """Recognise ``f(s) = h(s @ B, s)`` (one matrix product, then elementwise ops) on the lowered step graph.

    ``graph_module`` is the packed step at one position (:attr:`ChainProgram.lowered`:
    state ``(N, w)`` in, next state out). Returns ``None`` (use the generic
    Jacobian) unless: the state reaches exactly one ``mm``/``addmm`` node, as
    its first operand, through reshapes that keep the flat order, with shape
    ``(N, w)``; the other operand ``B`` (``(w, w)``) and any bias do not depend
    on the state; and every other node that depends on the state acts
    elementwise (:func:`~seqpar.runtime.structure.acts_elementwise`: a
    flat-order reshape or a pointwise op), ending in the single ``(N, w)`` output.
    """
    (output_node,) = [node for node in graph_module.graph.nodes if node.op == "output"]
    outputs = pytree.tree_leaves(output_node.args[0])
    if len(outputs) != 1 or not isinstance(outputs[0], torch.fx.Node):
        return None
    state, dependent = state_dependent(graph_module)
    (result,) = outputs
    linear = [node for node in dependent if node.target in _LINEAR_OPS]
    if len(linear) != 1 or result not in dependent:
        return None
    (linear,) = linear
    if linear.kwargs:  # addmm's beta / alpha
        return None
    *bias, operand, weight = linear.args
    if operand not in dependent or weight in dependent or any(b in dependent for b in bias):
        return None
    rows, width = node_shape(state)
    shapes = (node_shape(operand), node_shape(weight), node_shape(linear))
    if shapes != ((rows, width), (width, width), (rows, width)):
        return None
    head = set()  # the state and its reshapes leading to the product
    frontier = [operand]
    while frontier:
        node = frontier.pop()
        if node in head:
            continue
        if node is not state and node.target not in FLAT_VIEWS:
            return None
        head.add(node)
        frontier.extend(arg for arg in node.all_input_nodes if arg in dependent)
    if state not in head or result in head:  # the output must be reached through the product
        return None
    tail = dependent - head - {linear}
    if not all(acts_elementwise(node, dependent, rows * width) for node in tail):
        return None
    direct = any(arg in head for node in tail for arg in node.all_input_nodes)
    return AffinePointwise(graph_module, linear, weight, result, direct)


_windowed: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def windowed_steps(program, window: int, xs_leaves, shared, jacobian: str | None = None):
    """The batched step (with Jacobians unless ``"identity"``) traced for ``window`` positions.

    ``F_j = f(prev_j, x_j)`` for ``prev (W, N, w)`` and per-step inputs sliced to
    ``W`` rows. The program's own graphs are traced at the full length ``L``
    with static shapes, so a window gets its own trace (made once per program,
    window and ``jacobian``, by default the program's, and shared by the
    programs :meth:`ChainProgram.replace` makes;
    :func:`seqpar.runtime.chain.build_program` makes it up front).
    """
    jacobian = program.jacobian if jacobian is None else jacobian

    def steps():
        return program._steps if jacobian == "identity" else program._make_steps_and_jacobians(jacobian)

    return _windowed_trace(program, (jacobian, window), steps, window, xs_leaves, shared)


def windowed_steps_vjp(program, window: int, xs_leaves, shared):
    """:attr:`ChainProgram.steps_vjp` traced for ``window`` positions: ``(prev, xs, shared, lam)`` with ``prev``
    and ``lam`` ``(W, N, w)`` and the per-step inputs sliced to ``W`` rows (made once per window, as
    :func:`windowed_steps`; the inputs without gradients, ``frozen``, name the trace too)."""
    key = ("vjp", window, program.frozen)
    return _windowed_trace(program, key, lambda: program._steps_vjp, window, xs_leaves, shared, cotangent=True)


def windowed_outputs(program, window: int, xs_leaves, shared):
    """:meth:`ChainProgram.outputs_batched` traced for ``window`` positions (:attr:`ChainProgram.outputs_at` is
    it at ``L``): ``(prev, xs, shared)`` with ``prev`` ``(W, N, w)``, made once per window, as :func:`windowed_steps`."""
    return _windowed_trace(program, ("outputs", window), lambda: program.outputs_batched, window, xs_leaves, shared)


def _windowed_trace(program, key, make_fn, window: int, xs_leaves, shared, cotangent: bool = False):
    """``make_fn()`` traced on ``window`` positions (with a cotangent shaped like ``prev`` where ``cotangent``),
    cached under ``key`` for the program's lowered step."""
    per_program = _windowed.setdefault(program.lowered, {})
    traced = per_program.get(key)
    if traced is None:
        layout = program.layout
        prev = torch.empty(window, layout.batch_size, layout.width, dtype=layout.dtype, device=layout.device)
        xs = [torch.empty(window, *leaf.shape[1:], dtype=leaf.dtype, device=leaf.device) for leaf in xs_leaves]
        shared = [torch.empty_like(tensor) for tensor in shared]
        examples = (prev, xs, shared, torch.empty_like(prev)) if cotangent else (prev, xs, shared)
        traced = per_program[key] = _trace(make_fn(), *examples)
    return traced
