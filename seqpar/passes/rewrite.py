"""Replace a chain in an FX graph by one call of the runtime's chain op.

Guarantees: the rewritten graph computes the chain's final state (and every
intermediate state read after the chain) with ``seqpar::chain_solve``; per-layer
parameters are handed over unstacked (the op caches their stack); per-step
values computed in the graph are stacked in the graph; per-step literals become
a constant buffer. Nothing else in the graph changes; ``graph.lint()`` passes.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..runtime.chain import build_program
from ..runtime.newton import Tolerance
from ..runtime.program import ChainProgram, StateLayout
from .chain import Chain
from .policy import Decision


class StepAdapter:
    """``step(s, x_leaves, *shared) = chain.step(s, *x_leaves, *shared)``: the runtime's step signature."""

    def __init__(self, graph_step: fx.GraphModule):
        self.graph_step = graph_step

    def __call__(self, state, x_leaves, *shared):
        return self.graph_step(state, *x_leaves, *shared)


def example_value(node: fx.Node) -> torch.Tensor:
    value = node.meta.get("example_value", node.meta.get("val"))
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"node {node.name} has no tensor example value")
    return value


def _requires_grad(node: fx.Node) -> bool:
    return bool(example_value(node).requires_grad)


def _empty_like(value: torch.Tensor, lead: tuple[int, ...] = ()) -> torch.Tensor:
    """A real, uninitialised tensor shaped like a (fake) example value, for tracing."""
    return torch.empty(*lead, *value.shape, dtype=value.dtype, device=value.device)


def constant_stack(chain_input, dtype: torch.dtype, device) -> torch.Tensor:
    """Per-step literals -> one tensor ``(L, ...)``: floats in the state dtype, ints as int64."""
    values = chain_input.values
    if all(isinstance(value, torch.Tensor) for value in values):
        return torch.stack([value.detach().to(device) for value in values])
    if all(isinstance(value, int) and not isinstance(value, bool) for value in values):
        return torch.tensor(values, dtype=torch.int64, device=device)
    return torch.tensor([float(value) for value in values], dtype=dtype, device=device)


def build_chain_program(chain: Chain, decision: Decision, tol, max_iters) -> ChainProgram:
    """Trace the chain's step for the solver, with the decision's methods attached."""
    state = example_value(chain.start)
    layout = StateLayout(
        spec=pytree.tree_structure(state),
        batch_shape=torch.Size(chain.state_shape[: chain.batch_ndim]),
        leaf_shapes=(torch.Size(chain.state_shape[chain.batch_ndim :]),),
        dtype=chain.state_dtype,
        device=state.device,
    )
    xs_examples, param_slots = [], []
    for index, chain_input in enumerate(chain.per_step):
        if chain_input.kind == "constant":
            xs_examples.append(constant_stack(chain_input, chain.state_dtype, state.device))
        else:
            xs_examples.append(_empty_like(example_value(chain_input.nodes[0]), (chain.length,)))
            if chain_input.kind == "parameter":
                param_slots.append(index)
    shared_examples = [_empty_like(example_value(node)) for node in chain.shared]
    # Buffers (running statistics, masks) get no gradient; some ops do not differentiate them.
    frozen = frozenset(
        [("xs", i) for i, item in enumerate(chain.per_step) if item.kind == "parameter" and not _requires_grad(item.nodes[0])]
        + [("shared", i) for i, node in enumerate(chain.shared) if node.op == "placeholder" and not _requires_grad(node)]
    )
    window = decision.window if decision.window is not None and decision.window < chain.length else None
    if max_iters is None:  # a windowed solve needs at least L / W iterations
        max_iters = 40 if window is None else 4 * -(-chain.length // window) + 40
    solver_options = {
        "tol": Tolerance.resolve(tol, chain.state_dtype),
        "max_iters": min(max_iters, chain.length),
        "damping": 0.0,
        "window": window,
    }
    # Trace outside Dynamo's tracing context: its fake mode would make the sizes symbolic.
    with torch._guards.tracing(None), unset_fake_temporarily():
        program = build_program(
            StepAdapter(chain.step),
            layout,
            chain.length,
            pytree.tree_structure(list(xs_examples)),
            xs_examples,
            shared_examples,
            decision.jacobian if decision.method == "parallel" else "identity",
            decision.adjoint,
            solver_options,
            frozen,
            method=decision.method,
            sequential_reason=f"kept sequential: {decision.reason}",
        )
    program.param_slots = tuple(param_slots)
    return program


def rewrite_chain(gm: fx.GraphModule, chain: Chain, program: ChainProgram, index: int) -> dict:
    """Replace ``chain``'s nodes in ``gm`` by ``seqpar::chain_solve`` (in place; caller recompiles).

    Returns ``{old node: new node}`` for the chain's states that stay visible,
    so records of later chains that read them can be updated (:func:`remap_chain`).
    """
    graph = gm.graph
    chain_nodes = [node for segment in chain.nodes for node in segment]
    served = {chain.outputs[position] for position in chain.used_outside} | {chain.outputs[-1]}
    members = set(chain_nodes)
    for node in chain_nodes:
        if node in served:
            continue
        outside = [user for user in node.users if user not in members]
        if outside:
            raise ValueError(f"{node.name} inside the chain is read by {outside[0].name} outside it")

    layer_params = [node for item in chain.per_step if item.kind == "parameter" for node in item.nodes]
    batch = math.prod(chain.state_shape[: chain.batch_ndim])
    with graph.inserting_before(chain.outputs[-1]):
        xs_nodes = []
        for position, item in enumerate(chain.per_step):
            if item.kind == "computed":
                xs_nodes.append(graph.call_function(torch.stack, (list(item.nodes),)))
            elif item.kind == "constant":
                name = f"_seqpar_chain{index}_step_input{position}"
                gm.register_buffer(name, constant_stack(item, chain.state_dtype, example_value(chain.start).device))
                xs_nodes.append(graph.get_attr(name))
        packed = graph.call_method("reshape", (chain.start, (batch, -1)))
        states = graph.call_function(
            torch.ops.seqpar.chain_solve.default,
            (program.id, packed, xs_nodes, list(chain.shared), layer_params),
        )
        replacements = {}
        for position in sorted(set(chain.used_outside) | {chain.length - 1}):
            picked = graph.call_function(torch.ops.aten.select.int, (states, 0, position))
            replacements[chain.outputs[position]] = graph.call_method("reshape", (picked, tuple(chain.state_shape)))
    for old, new in replacements.items():
        new.meta.update({key: value for key, value in old.meta.items() if key in ("example_value", "val")})
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in members)
    for node in reversed(chain_nodes):
        if not node.users:
            graph.erase_node(node)
    restore_topological_order(graph)
    graph.lint()
    return replacements


def remap_chain(chain: Chain, replacements: dict) -> None:
    """Point ``chain``'s inputs at the nodes that replaced them in an earlier rewrite."""
    chain.start = replacements.get(chain.start, chain.start)
    chain.shared = [replacements.get(node, node) for node in chain.shared]
    for item in chain.per_step:
        item.nodes = [replacements.get(node, node) for node in item.nodes]


def restore_topological_order(graph: fx.Graph) -> None:
    """Move nodes (in place, keeping their identity) so every node follows its inputs.

    A depth-first order that visits inputs first and otherwise keeps the
    current order; the rewrite may have read an intermediate state before the
    chain call that now produces it.
    """
    order, placed = [], set()
    for root in graph.nodes:
        stack = [(root, False)]
        while stack:
            node, inputs_done = stack.pop()
            if node in placed:
                continue
            if inputs_done:
                placed.add(node)
                order.append(node)
                continue
            stack.append((node, True))
            stack.extend((parent, False) for parent in reversed(node.all_input_nodes) if parent not in placed)
    if order == list(graph.nodes):
        return
    for previous, node in zip(order, order[1:]):
        previous.append(node)
