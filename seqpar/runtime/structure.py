"""The structure of a step's Jacobian, proven from its traced graph: diagonal, affine, max-plus, or neither.

The graph is the packed step lowered to aten ops on one position
(:func:`~seqpar.runtime.program.lower_step`): ``f(s, x_leaves, shared)`` with
the state ``s`` of shape ``(N, w)`` as its first placeholder and one output of
shape ``(N, w)``. A node *depends on the state* when ``s`` is among its
ancestors (:func:`state_dependent`); ``J = df/ds`` is the ``(N w) x (N w)``
Jacobian over the flat state.

* **Diagonal** (``f(s)_i`` reads ``s_i`` alone): every node that depends on
  the state *acts elementwise* (:func:`acts_elementwise`): a pointwise op
  (``torch.Tag.pointwise``) whose state-dependent operands have as many
  elements as its output, in the same flat order (operands that do not depend
  on the state may broadcast), or a reshape that keeps the flat order
  (:data:`FLAT_VIEWS`); and the output has ``N w`` elements. Element ``i`` of
  each such node is then a function of element ``i`` of the state: a
  broadcast operand with as many elements as the output differs from it by
  size-1 dims only. Mamba's selective scan ``s = dA_l * s + dBu_l``, an LRU,
  a gate ``sigmoid(g_l) * s + ...`` are diagonal; a sum over state values, a
  ``flip``, a transpose of a state view or a matrix product are not. The
  batch elements of a diagonal step are independent at any ``batch_ndim``,
  and its Jacobian is its diagonal, ``J = diag(J^T 1)``: one vector-Jacobian
  product with a cotangent of ones, exact.
* **Affine** (``f(s) = A s + c``, ``A`` and ``c`` independent of the state):
  every node that depends on the state is affine in its state-dependent
  operands (:data:`AFFINE_OPS`): sums and differences of any of them, a
  product (``mul``, ``mm``, ``bmm``, ``addmm``'s product, ...) in which one
  factor alone depends on the state, a quotient whose divisor does not,
  selections by state-independent conditions or indices, reshapes,
  permutations, slices, concatenations and sums. By induction every
  state-dependent value, the output included, is affine in ``s``. ``s * s``
  or ``tanh(W s + x)`` are not. An affine chain
  ``s_l = A_l s_{l-1} + c_l`` is solved exactly by one linear solve
  (:func:`seqpar.runtime.newton.linear_solve`).

* **Max-plus** (``f(s) = max(s + a, b)`` elementwise, ``a`` and ``b``
  independent of the state, ``-inf`` allowed): a diagonal step, not affine,
  whose every state-dependent node adds a state-independent value to one
  state-dependent operand (``add``, ``sub`` of a state-independent value),
  takes a maximum (``maximum`` of any operands, ``clamp_min``) or is a flat
  reshape (:func:`_maxplus_in_state`). By induction every state-dependent
  value is ``max(s + a_n, b_n)``: ``(max(s + a, b)) + c = max(s + (a + c),
  b + c)``, ``max(max(s + a1, b1), max(s + a2, b2)) = max(s + max(a1, a2),
  max(b1, b2))``. The running maximum that keeps RWKV's and xLSTM's
  exponentials in range, ``m_t = max(m_{t-1} + w, k_t)``, is one; affine in
  the max-plus semiring, it is solved in one pass
  (:mod:`seqpar.runtime.maxplus`).

All are proofs about the operations in the graph, not numerical probes: an op
outside these lists answers "no" (the general solver), never a wrong "yes".
A step whose output does not depend on the state (``J = 0``) is diagonal and affine.
"""

from __future__ import annotations

import math
import operator
import weakref
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

_aten = torch.ops.aten
# Reshapes that keep the elements' flat order: element i of the input is element i of the output.
FLAT_VIEWS = (
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


def _rule(linear=(), factors=()):
    """``(linear, factors)`` argument positions: the op is affine in the ``linear`` ones together and in at most
    one of the ``factors`` (a product); every other argument must not depend on the state."""
    return frozenset(linear), frozenset(factors)


_FIRST = _rule(linear=(0,))
# What each op is affine in (see _rule); an op not listed is not known to be affine.
AFFINE_OPS = {
    **dict.fromkeys((_aten.add.Tensor, _aten.sub.Tensor, _aten.rsub.Tensor), _rule(linear=(0, 1))),
    **dict.fromkeys(
        (
            *FLAT_VIEWS,
            _aten.add.Scalar, _aten.sub.Scalar, _aten.rsub.Scalar, _aten.neg.default,
            _aten.mul.Scalar, _aten.div.Scalar, _aten.div.Tensor,
            _aten.permute.default, _aten.transpose.int, _aten.t.default, _aten.expand.default,
            _aten.slice.Tensor, _aten.select.int, _aten.cat.default, _aten.stack.default,
            _aten.split.Tensor, _aten.split_with_sizes.default, _aten.unbind.int, _aten.flip.default,
            _aten.roll.default, _aten.sum.dim_IntList, _aten.sum.default, _aten.mean.dim, _aten.cumsum.default,
            _aten.diagonal.default, _aten.diag_embed.default, _aten.constant_pad_nd.default,
            _aten.index_select.default, _aten.gather.default, _aten.index.Tensor, operator.getitem,
        ),
        _FIRST,
    ),
    **dict.fromkeys(
        (_aten.mul.Tensor, _aten.mm.default, _aten.bmm.default, _aten.mv.default, _aten.dot.default),
        _rule(factors=(0, 1)),
    ),
    **dict.fromkeys((_aten.addmm.default, _aten.baddbmm.default, _aten.addcmul.default), _rule((0,), (1, 2))),
    _aten.where.self: _rule(linear=(1, 2)),
}


def is_pointwise(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


def node_shape(node) -> tuple | None:
    """The shape of a node's (fake) value, ``None`` when it has none."""
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _numel(node) -> int | None:
    shape = node_shape(node)
    return None if shape is None else math.prod(shape)


def state_dependent(graph_module: torch.fx.GraphModule) -> tuple[torch.fx.Node, set]:
    """``(s, nodes)``: the state placeholder (the graph's first) and every node that depends on it, ``s`` included."""
    nodes = list(graph_module.graph.nodes)
    state = next(node for node in nodes if node.op == "placeholder")
    dependent = {state}
    for node in nodes:
        if node.op == "call_function" and any(arg in dependent for arg in node.all_input_nodes):
            dependent.add(node)
    return state, dependent


def acts_elementwise(node: torch.fx.Node, dependent: set, numel: int) -> bool:
    """Whether element ``i`` of ``node`` (``numel`` elements) depends on element ``i`` of its state-dependent inputs only.

    True for a reshape that keeps the flat order (:data:`FLAT_VIEWS`, its
    sizes not state-dependent) or a pointwise op, when the node and each of
    its state-dependent inputs have ``numel`` elements.
    """
    if node.target in FLAT_VIEWS:
        if any(isinstance(arg, torch.fx.Node) and arg in dependent for arg in node.args[1:]):
            return False
    elif not is_pointwise(node.target):
        return False
    return _numel(node) == numel and all(_numel(arg) == numel for arg in node.all_input_nodes if arg in dependent)


def _affine_in_state(node: torch.fx.Node, dependent: set) -> bool:
    """Whether ``node`` is affine in its state-dependent arguments (:data:`AFFINE_OPS`)."""
    rule = AFFINE_OPS.get(node.target)
    if rule is None:
        return False
    linear, factors = rule

    def depends(value) -> bool:
        return any(isinstance(leaf, torch.fx.Node) and leaf in dependent for leaf in pytree.tree_leaves(value))

    if depends(node.kwargs):
        return False
    positions = [index for index, arg in enumerate(node.args) if depends(arg)]
    return all(index in linear or index in factors for index in positions) and (
        sum(index in factors for index in positions) <= 1
    )


# Max-plus steps: the ops that add a state-independent value to the state-dependent operand at a position in
# ``adds`` (any one of them), and the ops that take a maximum.
_MAXPLUS_ADDS = {_aten.add.Tensor: (0, 1), _aten.sub.Tensor: (0,), _aten.add.Scalar: (0,), _aten.sub.Scalar: (0,)}
_MAXPLUS_MAXIMA = {_aten.maximum.default: (0, 1), _aten.clamp_min.default: (0,), _aten.clamp_min.Tensor: (0,)}


def _maxplus_in_state(node: torch.fx.Node, dependent: set) -> bool:
    """Whether ``node`` maps ``max(s + a, b)`` forms of its state-dependent operands to one (module docstring):
    a flat reshape of one, one plus (or minus) a state-independent value (``alpha`` 1), a maximum."""
    positions = [index for index, arg in enumerate(node.args) if isinstance(arg, torch.fx.Node) and arg in dependent]
    if any(isinstance(leaf, torch.fx.Node) and leaf in dependent for leaf in pytree.tree_leaves(node.kwargs)):
        return False
    if node.target in FLAT_VIEWS:
        return positions == [0]
    if node.target in _MAXPLUS_ADDS:
        return len(positions) == 1 and positions[0] in _MAXPLUS_ADDS[node.target] and node.kwargs.get("alpha", 1) == 1
    if node.target in _MAXPLUS_MAXIMA:
        return bool(positions) and all(index in _MAXPLUS_MAXIMA[node.target] for index in positions)
    return False


def is_maximum(node: torch.fx.Node) -> bool:
    """Whether ``node`` is one of the maxima a max-plus step may take."""
    return node.target in _MAXPLUS_MAXIMA


@dataclass(frozen=True)
class StepStructure:
    """What a traced step's Jacobian is (see the module docstring): ``diagonal``, ``affine``, ``maxplus``, and
    ``how``: the rule that proved each property or the first op that ruled it out, for reports."""

    diagonal: bool
    affine: bool
    how: str
    maxplus: bool = False

    @property
    def label(self) -> str:
        """``"diagonal affine"``, ``"diagonal max-plus"``, ``"diagonal"``, ``"affine"`` or ``"general"``."""
        held = (("diagonal", self.diagonal), ("affine", self.affine), ("max-plus", self.maxplus))
        return " ".join(name for name, holds in held if holds) or "general"


def find_step_structure(graph_module: torch.fx.GraphModule) -> StepStructure:
    """Prove from the traced step graph (state ``(N, w)`` in, one ``(N, w)`` out) whether ``J`` is diagonal and
    whether the step is affine in the state (module docstring)."""
    state, dependent = state_dependent(graph_module)
    (output,) = [node for node in graph_module.graph.nodes if node.op == "output"]
    results = pytree.tree_leaves(output.args[0])
    numel = _numel(state)
    if len(results) != 1 or numel is None:
        return StepStructure(False, False, "not analysed: the traced step has no single output or no state shape")
    (result,) = results
    if result not in dependent:
        return StepStructure(True, True, "the output does not depend on the state (J = 0)")
    operations = [node for node in graph_module.graph.nodes if node in dependent and node is not state]
    mixing = next((node for node in operations if not acts_elementwise(node, dependent, numel)), None)
    if mixing is None and _numel(result) != numel:
        mixing = result
    nonlinear = next((node for node in operations if not _affine_in_state(node, dependent)), None)
    diagonal = (
        "diagonal: every state-dependent op is pointwise or a flat reshape"
        if mixing is None
        else f"not diagonal: {mixing.target} ({mixing.name}) does not act elementwise on the state"
    )
    affine = (
        "affine: every state-dependent op is affine in the state"
        if nonlinear is None
        else f"not affine: {nonlinear.target} ({nonlinear.name}) is not affine in the state"
    )
    maxplus = ""
    if mixing is None and nonlinear is not None:
        blocker = next((node for node in operations if not _maxplus_in_state(node, dependent)), None)
        maxplus = ("; max-plus: every state-dependent op adds a state-independent value, takes a maximum or is a "
                   "flat reshape" if blocker is None else f"; not max-plus: {blocker.target} ({blocker.name})")
    return StepStructure(mixing is None, nonlinear is None, f"{diagonal}; {affine}{maxplus} (traced step graph)",
                         maxplus=maxplus.startswith("; max-plus"))


_FOUND: "weakref.WeakKeyDictionary[torch.fx.GraphModule, StepStructure]" = weakref.WeakKeyDictionary()


def step_structure(graph_module: torch.fx.GraphModule) -> StepStructure:
    """:func:`find_step_structure`, found once per traced graph."""
    structure = _FOUND.get(graph_module)
    if structure is None:
        structure = _FOUND[graph_module] = find_step_structure(graph_module)
    return structure
