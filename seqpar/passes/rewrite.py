"""Replace a chain in an FX graph by one call of the runtime's chain op.

Guarantees: the rewritten graph computes the chain's final state (and every
intermediate state read after the chain, and the stacked states a scan's
per-step outputs hold) with ``seqpar::chain_solve``, and every per-step
output read after the chain with ``seqpar::chain_outputs`` (a ``torch.stack``
of one output at every step becomes a view of the op's stacked output), on the
state packed to ``(N, w)`` by the program's :class:`StateLayout` (a tuple
state's tensors side by side per batch element); per-layer
parameters are handed over unstacked (the op stacks them per call) or stacked in
the graph (:func:`seqpar.passes.lower.stacks_parameters_in_graph`); a slice input ``P[a + l]`` is
handed over as ``P`` (or ``P.narrow(0, a, L)``), and the selects and views of
``P`` only the chain read are erased; per-step values computed in the graph are
stacked in the graph; per-step literals become a constant buffer. Nothing else
in the graph changes; ``graph.lint()`` passes, and every node the rewrite
created carries a fake ``example_value`` (and ``val``) of the value it computes
(:func:`annotate_new_nodes`), as Dynamo's own nodes do. An input of the chain
ops that a later node of the graph writes to in place (xLSTM stores its final
state in the buffer its initial state was read from) is handed over as a clone
(:func:`_kept_from_later_writes`): the ops keep their inputs for the backward,
and autograd refuses a saved tensor changed since.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor

from ..runtime.program import ChainProgram, StateLayout
from ..runtime.slicing import slice_steps
from .chain import Chain, map_state, state_leaves
from .effects import mutates
from .inplace import storages, tensor_storage
from .inputs import constant_stack
from .tokens import example


def rewrite_chain(gm: fx.GraphModule, chain: Chain, program: ChainProgram, index: int) -> dict:
    """Replace ``chain``'s nodes in ``gm`` by ``seqpar::chain_solve`` (in place; caller recompiles).

    Returns ``{old node: new node}`` for the chain's states that stay visible,
    so records of later chains that read them can be updated (:func:`remap_chain`).
    """
    graph = gm.graph
    chain_nodes = [node for segment in chain.nodes for node in segment]
    positions = sorted(set(chain.used_outside) | {chain.length - 1})
    served = {node for position in positions for node in state_leaves(chain.outputs[position]) if node is not None}
    stacked = [] if chain.all_states is None else state_leaves(chain.all_states)
    served |= {node for node in stacked if node is not None}
    served |= {node for row in chain.per_step_outputs for node in row if node is not None}
    members = set(chain_nodes)
    for node in chain_nodes:
        if node in served:
            continue
        outside = [user for user in node.users if user not in members]
        if outside:
            raise ValueError(f"{node.name} inside the chain is read by {outside[0].name} outside it")

    # Parameters the program caches (its ``param_slots``) go to the op unstacked; the rest are stacked here.
    cached = set(program.param_slots)
    layer_params = [node for slot in program.param_slots for node in chain.per_step[slot].nodes]
    last = next(node for node in reversed(chain.nodes[-1]) if node in served)  # the final state's last leaf
    existing = set(graph.nodes)
    kept = _kept_from_later_writes(graph, last)
    with graph.inserting_before(last):
        xs_nodes = []
        for position, item in enumerate(chain.per_step):
            if item.kind == "computed" or (item.kind == "parameter" and position not in cached):
                xs_nodes.append(graph.call_function(torch.stack, (list(item.nodes),)))
            elif item.kind == "slice":
                xs_nodes.append(kept(_slice(graph, item, chain.length), [item.nodes[0]]))
            elif item.kind == "constant":
                name = f"_seqpar_chain{index}_step_input{position}"
                gm.register_buffer(name, constant_stack(item, chain.state_dtype, program.layout.device))
                xs_nodes.append(graph.get_attr(name))
        s0 = kept(_pack(graph, chain.start, program.layout), state_leaves(chain.start))
        shared = [kept(node, [node]) for node in chain.shared]
        states = graph.call_function(
            torch.ops.seqpar.chain_solve.default, (program.id, s0, xs_nodes, shared, layer_params)
        )
        replacements = {}
        for position in positions:
            picked = graph.call_function(torch.ops.aten.select.int, (states, 0, position))
            unpacked = zip(state_leaves(chain.outputs[position]), _unpack(graph, picked, program.layout))
            replacements.update((old, new) for old, new in unpacked if old is not None)
        if any(node is not None for node in stacked):
            unpacked = zip(stacked, _unpack(graph, states, program.layout, (chain.length,)))
            replacements.update((old, new) for old, new in unpacked if old is not None)
        if chain.per_step_outputs:
            served_outputs = graph.call_function(
                torch.ops.seqpar.chain_outputs.default,
                (program.id, s0, states, xs_nodes, shared, layer_params),
            )
            for index, row in enumerate(chain.per_step_outputs):
                every = graph.call_function(operator.getitem, (served_outputs, index))
                replacements.update(_per_step_reads(graph, row, every))
    for old, new in replacements.items():
        new.meta.update({key: value for key, value in old.meta.items() if key in ("example_value", "val")})
    _replace_reads(replacements, members)
    for old in [old for old in replacements if old not in members and not old.users]:
        graph.erase_node(old)  # a stack of a per-step output, served whole
    inputs = {parent for node in chain_nodes for parent in node.all_input_nodes} - members
    for node in reversed(chain_nodes):
        if not node.users:
            graph.erase_node(node)
    _erase_dead(graph, inputs)
    for node in reversed(list(graph.nodes)):  # unpacked leaves of a tuple state that nothing reads
        if node not in existing and not node.users:
            graph.erase_node(node)
    replacements = {old: new for old, new in replacements.items() if new.users}
    restore_topological_order(graph)
    graph.lint()
    annotate_new_nodes(gm, [node for node in graph.nodes if node not in existing])
    return replacements


def _replace_reads(replacements: dict, members: set) -> None:
    """Every read of an ``old`` node of ``replacements`` by a node outside ``members`` reads its ``new`` node
    instead. Each reader's arguments are rewritten once: ``replace_all_uses_with`` per old node rewrites a
    reader's whole argument list per replaced input, ``O(L^2)`` for a stack of ``L`` states."""
    readers = {user: None for old in replacements for user in old.users if user not in members}
    for reader in readers:
        reader.args = fx.node.map_arg(reader.args, lambda node: replacements.get(node, node))
        reader.kwargs = fx.node.map_arg(reader.kwargs, lambda node: replacements.get(node, node))


def _per_step_reads(graph: fx.Graph, row: list, every: fx.Node) -> dict:
    """``{old node: new node}`` for one per-step output: ``row[l]`` (read after the chain, or ``None``) becomes
    ``every[l]``; a ``torch.stack`` of the whole row on dim ``d`` becomes ``every.movedim(0, d)``, one view
    instead of ``L`` selects and a copy."""
    replacements = {}
    for node in {user for old in row if old is not None for user in old.users}:
        listed = node.args[0] if node.target is torch.stack and node.args else None
        whole = isinstance(listed, (list, tuple)) and list(listed) == row and set(node.kwargs) <= {"dim"}
        if whole and all(len(old.users) == 1 for old in row):  # the stack alone reads them: a view is safe
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            replacements[node] = graph.call_function(torch.movedim, (every, 0, dim))
    for position, old in enumerate(row):
        if old is not None:
            replacements[old] = graph.call_function(torch.ops.aten.select.int, (every, 0, position))
    return replacements


def annotate_new_nodes(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Give each of ``nodes`` (in graph order) ``meta["example_value"]`` and ``meta["val"]``: its value computed
    on its inputs' fake example values, in their fake mode. Raises ValueError naming a node whose value cannot be
    computed (the backend then leaves the chain unchanged)."""
    leaves = (leaf for node in gm.graph.nodes for leaf in pytree.tree_leaves(example(node)))
    first = next((leaf for leaf in leaves if isinstance(leaf, FakeTensor)), None)  # not every node's, per chain
    if first is None:
        return  # a graph without fake values (built by hand in a test): nothing to keep consistent
    mode = first.fake_mode  # invoke_subgraph bodies may carry values of other fake modes: brought into this one

    def value_of(node):
        value = example(node)
        if value is None:
            raise ValueError(f"{node.name} has no example value")
        return pytree.tree_map(
            lambda leaf: mode.from_tensor(leaf) if isinstance(leaf, FakeTensor) and leaf.fake_mode is not mode else leaf,
            value,
        )

    with mode:
        for node in nodes:
            if node.meta.get("example_value") is not None:
                continue
            try:
                if node.op == "get_attr":
                    value = mode.from_tensor(getattr(gm, node.target))
                else:
                    args = fx.node.map_arg(node.args, value_of)
                    kwargs = fx.node.map_arg(node.kwargs, value_of)
                    target = getattr(args[0], node.target) if node.op == "call_method" else node.target
                    value = target(*(args[1:] if node.op == "call_method" else args), **kwargs)
            except Exception as error:
                raise ValueError(f"no example value for {node.name} ({type(error).__name__}: {error})") from error
            node.meta["example_value"] = node.meta["val"] = value


def _kept_from_later_writes(graph: fx.Graph, last: fx.Node):
    """``kept(value, sources)``: ``value`` (a chain op's input made from the nodes ``sources``), or a clone of it
    inserted at the insertion point where a node after ``last`` writes in place to a tensor sharing a storage
    with one of ``sources``, or where their storage is unknown and some node after ``last`` writes in place.
    Only the written tensors' storages are looked up (not every node's: a chain of an unrolled loop is rewritten
    in a graph of ``O(L)`` nodes, per chain)."""
    after = False
    written = []
    for node in graph.nodes:
        if after and mutates(node):
            target = node.kwargs.get("out", node.args[0] if node.args else None)
            written.append(target if isinstance(target, fx.Node) else None)
        after = after or node is last
    if not written:
        return lambda value, sources: value
    unknown_target = None in written
    written_storages = {key for target in written if target is not None for key in storages(example(target))}

    def kept(value: fx.Node, sources: list[fx.Node]) -> fx.Node:
        for source in sources:
            key = tensor_storage(source)
            if key is None or unknown_target or key in written_storages:
                return graph.call_method("clone", (value,))
        return value

    return kept


def _slice(graph: fx.Graph, item, length: int) -> fx.Node:
    """A slice input's ``L`` slices, stacked on dim 0, as a graph value (:func:`slice_steps`)."""
    return graph.call_function(slice_steps, (item.nodes[0], item.dim, item.start, item.stride, length))


def _erase_dead(graph: fx.Graph, candidates: set) -> None:
    """Erase the nodes of ``candidates`` nothing reads any more (pure calls and attributes), then their inputs.

    What the chain alone read: the per-step selects ``P[a + l]`` of a slice
    input, the views the step now takes itself, ``invoke_subgraph`` bodies.
    """
    todo, erased = list(candidates), set()
    while todo:
        node = todo.pop()
        if node in erased or node.users or node.op not in ("call_function", "call_method", "get_attr") \
                or node.is_impure():
            continue
        todo.extend(node.all_input_nodes)
        graph.erase_node(node)
        erased.add(node)


def _pack(graph: fx.Graph, start, layout: StateLayout) -> fx.Node:
    """``layout.pack(start)`` as graph nodes: every leaf reshaped to ``(N, -1)``, side by side: ``(N, w)``."""
    flat = [graph.call_method("reshape", (leaf, (layout.batch_size, -1))) for leaf in state_leaves(start)]
    return flat[0] if len(flat) == 1 else graph.call_function(torch.cat, (flat, -1))


def _unpack(graph: fx.Graph, packed: fx.Node, layout: StateLayout, lead: tuple[int, ...] = ()) -> list[fx.Node]:
    """``layout.unpack(packed)`` as graph nodes: ``(*lead, N, w)`` -> the state's leaves,
    ``(*lead, *batch, *leaf shape)`` each (``lead = (L,)``: all ``L`` states at once)."""
    shapes = [(*lead, *layout.batch_shape, *shape) for shape in layout.leaf_shapes]
    if len(shapes) == 1:
        return [graph.call_method("reshape", (packed, shapes[0]))]
    parts = graph.call_method("split", (packed, [math.prod(shape) for shape in layout.leaf_shapes], -1))
    return [graph.call_method("reshape", (graph.call_function(operator.getitem, (parts, index)), shape))
            for index, shape in enumerate(shapes)]


def remap_chain(chain: Chain, replacements: dict) -> None:
    """Point ``chain``'s inputs at the nodes that replaced them in an earlier rewrite."""
    chain.start = map_state(lambda node: replacements.get(node, node), chain.start)
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
