"""What detection finds in an FX graph: plain records, no numerics.

A :class:`Chain` is a maximal run of ``L`` isomorphic segments of a graph where
segment ``l`` computes ``s_l = f(s_{l-1}, x_l, *shared)``: it reads the graph
only through the carried state ``s_{l-1}``, its per-step inputs ``x_l`` (the
parameters of layer ``l``, slices ``P[a + l]`` of one stacked tensor,
per-step literals, hoisted state-independent values) and inputs shared by
every segment.

The state is one tensor or a fixed tuple of tensors (an LSTM's ``(h, c)``); in
a record it is one node, or a tuple with one node per tensor (a "leaf"):
:func:`state_leaves` and :func:`map_state` treat both alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
import torch.fx as fx

from .tokens import example

CHAIN_KINDS = ("layers", "residual", "denoise", "recurrent", "transformer")
INPUT_KINDS = ("parameter", "slice", "computed", "constant")

# A state in a record: one node, or one node per tensor of a tuple state.
State = Union[fx.Node, tuple[fx.Node, ...]]


def state_leaves(state) -> list:
    """The leaves of a state, in order: ``[state]`` for one tensor, its items for a tuple."""
    return list(state) if isinstance(state, tuple) else [state]


def as_state(items: list):
    """A state in a record: the one item of a tensor state, or the tuple of items of a tuple state."""
    return items[0] if len(items) == 1 else tuple(items)


def map_state(fn: Callable, state):
    """``state`` with every leaf ``x`` replaced by ``fn(x)``, keeping its structure (``None`` leaves stay)."""
    if isinstance(state, tuple):
        return tuple(None if leaf is None else fn(leaf) for leaf in state)
    return fn(state)


def leaf_shapes(state_shape: tuple) -> list[tuple[int, ...]]:
    """The shape of every leaf: ``state_shape`` is one shape, or a tuple of shapes for a tuple state."""
    if state_shape and all(isinstance(shape, tuple) for shape in state_shape):
        return list(state_shape)
    return [tuple(state_shape)]


@dataclass
class ChainInput:
    """One per-step input of the step function, seen across the ``L`` steps.

    ``kind``:
      * ``"parameter"``: ``nodes[l]`` are graph placeholders (Dynamo lifts
        parameters and buffers to placeholders); stacked once and cached.
      * ``"slice"``: step ``l`` reads ``P.select(dim, start + stride * l)``
        of one tensor ``P`` (``nodes == [P]``: a placeholder, such as a
        parameter that holds every layer's weights or a sequence ``x`` read as
        ``x[:, t]``, or a state-independent value): the ``L`` slices reach
        the op as ``slices.slice_steps(P, dim, start, stride, L)``, a view of
        ``P`` for consecutive rows on dim 0 and one copy otherwise, never a
        stack of ``L`` selects. The step takes the slice (views of it such as
        ``.T`` are part of the step).
      * ``"computed"``: ``nodes[l]`` are graph values that do not depend on the
        state (hoisted out of the step); stacked on every call.
      * ``"constant"``: ``values[l]`` are Python numbers or tensors that differ
        between steps (timesteps, coefficients) and are literals in the graph.
    """

    kind: str
    nodes: list[fx.Node] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)
    start: int = 0  # "slice": the index of step 0's slice on dim ``dim``
    dim: int = 0
    stride: int = 1  # "slice": step l reads index start + stride * l


@dataclass
class Chain:
    """A chain found in a graph, ready for the rewrite.

    ``step`` is an ``fx.GraphModule`` built from segment 0 whose placeholders
    are, in order, the state (a tensor, or a tuple for a tuple state), one per
    entry of ``per_step`` (the slice of step ``l``; a ``"constant"`` input
    arrives as a 0-d or stacked-slice tensor), and one per entry of ``shared``;
    it returns the next state, structured like the state. ``start`` is the
    state ``s_0`` (a node, or a tuple of nodes); ``nodes[l]`` are the graph
    nodes of segment ``l`` (the rewrite erases them); ``outputs[l]`` is
    ``s_{l+1}``, structured like ``start``; a leaf of the last output is
    ``None`` where the graph does not compute it (Dynamo dropped a value the
    last step does not need; the op computes it, nothing reads it);
    ``used_outside`` lists the indexes ``l < L-1`` of states some leaf of
    which is read by nodes after the chain; ``all_states`` (structured like
    ``start``, ``None`` leaves where not read) are nodes holding every state
    stacked, ``(L, *leaf shape)``, read after the chain (a scan's per-step
    outputs that copy its carry). ``per_step_outputs[j][l]`` is the node of
    per-step output ``j`` at step ``l`` (a tensor segment ``l`` computes besides
    its state, ``y_l = g(s_{l-1}, x_l, *shared)``), ``None`` where nothing after
    the chain reads it; ``output_step`` is ``g``: a ``GraphModule`` with the
    step's placeholders returning the tuple ``(y^1_l, .., y^J_l)`` (``None``
    without per-step outputs), whose state is ``s_l`` (the step's result)
    where ``outputs_read_next``: ``y_l = g(s_l, x_l, *shared)``. ``origin``: "unrolled" (segments of an
    unrolled loop) or "scan" (one ``torch.ops.higher_order.scan`` call, whose
    ``nodes`` are ``[[scan, *its getitems, ...]]`` and whose intermediate
    ``outputs`` are ``None``: the graph holds no node for them).
    ``state_shape`` is the state's shape, or a tuple of shapes (one per leaf)
    for a tuple state. ``batch_ndim`` is the number of leading state dims the
    step treats independently (per-element Jacobian blocks); every leaf of a
    tuple state has these same leading dims.
    """

    kind: str
    start: State
    outputs: list[State]
    nodes: list[list[fx.Node]]
    step: fx.GraphModule
    per_step: list[ChainInput]
    shared: list[fx.Node]
    modules: list[str]
    state_shape: tuple
    state_dtype: torch.dtype
    batch_ndim: int
    used_outside: list[int] = field(default_factory=list)
    all_states: State | None = None
    origin: str = "unrolled"
    per_step_outputs: list[list[fx.Node | None]] = field(default_factory=list)
    output_step: fx.GraphModule | None = None
    outputs_read_next: bool = False

    @property
    def length(self) -> int:
        return len(self.outputs)

    @property
    def leaf_shapes(self) -> list[tuple[int, ...]]:
        """The shape of every tensor of the state (one for a single-tensor state)."""
        return leaf_shapes(self.state_shape)

    @property
    def records_autograd(self) -> bool:
        """Whether autograd records the chain in its graph: a value some segment computes requires grad (Dynamo
        traces in the call's grad mode, and its example values carry what autograd would record). A chain that
        records nothing (an inference graph, a frozen stack fed inputs without grad) never runs a backward."""
        return any(isinstance(value := example(node), torch.Tensor) and value.requires_grad
                   for segment in self.nodes for node in segment)


@dataclass
class Candidate:
    """A repeated structure detection saw but did not turn into a :class:`Chain`.

    Reported by ``seqpar.explain`` and the debug dump with its ``reason``.
    """

    kind: str
    length: int
    modules: list[str]
    state_shape: tuple | None  # like Chain.state_shape
    reason: str
    origin: str = "unrolled"  # like Chain.origin


def values_reason(chain: Chain) -> str | None:
    """Why the shapes or dtypes of ``chain``'s values keep it out of the chain op, or ``None``.

    A state without elements (a batch of 0) has nothing to solve for.
    The op solves for real floating-point states (Newton's linear steps, the tolerances, the float64 checks)
    and its adjoint returns gradients for real floating-point tensors only: an integer state has no Newton step,
    and a complex state, per-step input, shared input or per-step output would lose its gradient (its
    vector-Jacobian products are conjugate-linear, never taken). Such a chain is left to the inner backend.
    """
    if any(0 in shape for shape in chain.leaf_shapes):
        return f"the state {chain.state_shape} has no elements: nothing to solve for"
    if not chain.state_dtype.is_floating_point:
        return f"the state is {chain.state_dtype}: only real floating-point states are solved for"
    inputs = [node for item in chain.per_step for node in item.nodes] + list(chain.shared)
    outputs = [node for step in chain.per_step_outputs for node in step if node is not None]
    for what, nodes in (("input", inputs), ("per-step output", outputs)):
        value = next((value for value in map(example, nodes)
                      if isinstance(value, torch.Tensor) and value.is_complex()), None)
        if value is not None:
            return (f"a {what} of the step is {value.dtype}: the chain op differentiates real floating-point "
                    "tensors only (a complex one would lose its gradient)")
    if any(isinstance(value, complex) or (isinstance(value, torch.Tensor) and value.is_complex())
           for item in chain.per_step for value in item.values):
        return "a per-step literal is complex: the chain op differentiates real floating-point tensors only"
    return None
