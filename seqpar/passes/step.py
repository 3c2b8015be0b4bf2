"""Build a chain's step function: segment 0 of a :class:`~seqpar.passes.segments.Plan` as a GraphModule.

``build_step(plan, seq, root)`` returns ``step(state, *per_step, *shared) ->
next state``. Guarantees: the step computes exactly what segment 0's
state-dependent nodes compute (same targets, arguments and meta); its
placeholders are the state, one per per-step input of the plan and one per
shared input, in the plan's order (a ``"slice"`` input's placeholder is the
slice ``P[start + l]``; the views segment 0 takes of it are copied into the
step); a tuple state arrives as one tuple (the
step takes its leaves with ``getitem``) and the step returns a tuple of the
same length; ``call_method`` nodes become calls of the ``torch.Tensor``
function, the segment's in-place ops (which detection allows only on the
segment's own values, :mod:`.inplace`) become their out-of-place twins and
calls of a body graph (``invoke_subgraph``, activation checkpointing) are inlined, so the graph holds ``call_function``
nodes only and runs under ``vmap``/``make_fx``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import Node

from .effects import mutates, out_of_place
from .segments import Plan
from .tokens import VALUE_COPIES, example, rebuild_args, subgraph_call, target_name


def build_step(plan: Plan, seq: list[Node], root: torch.nn.Module) -> fx.GraphModule:
    """``step(state, *per_step, *shared) -> next state``, copied from segment 0 of ``plan``.

    ``seq`` is the node sequence the plan indexes; ``root`` the graph's module
    (it holds the bodies of the calls of body graphs, :data:`~.tokens.SUBGRAPH_CALLS`).
    """
    graph, leaves, env = _copy_segment(plan, seq, root)
    outputs = [env[seq[plan.begin + q]] for q in plan.state_offsets]
    graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    return _module(graph)


def build_output_step(plan: Plan, seq: list[Node], root: torch.nn.Module) -> tuple[fx.GraphModule, bool]:
    """``(g, reads_next)``: the per-step outputs ``g(state, *per_step, *shared) -> (y_1, ..)`` of
    ``plan.output_offsets``, with only the nodes they need.

    ``reads_next``: the outputs read the state only through the next state the
    segment computes (a readout ``W s_l``, Mamba's ``C s_l``), and ``g``'s state
    placeholder is that next state ``s_l``: evaluated at the solved states, the
    step is not computed again. Otherwise ``g`` takes ``s_{l-1}`` (a layer's
    key/value cache reads its input). A next state that is a same-value copy
    of a node (``C.to(float32)`` of a float32 ``C``, a ``clone``) counts from
    that node: xLSTM's readout ``q @ C.to(dtype)`` and its carried ``C.to(dtype)``
    are two casts of one value.
    """
    graph, leaves, env = _copy_segment(plan, seq, root)
    outputs = [env[seq[plan.begin + q]] for q in plan.output_offsets]
    graph.output(tuple(outputs))
    state_nodes = [_value_source(env[seq[plan.begin + q]]) for q in plan.state_offsets]
    reads_next = _through(leaves, state_nodes, outputs)
    if reads_next:
        for node, leaf in zip(state_nodes, leaves):
            node.replace_all_uses_with(leaf)
    graph.eliminate_dead_code()
    return _module(graph), reads_next


# Calls whose result has its input's value where dtype, device and shape are unchanged: copies and casts.
_SAME_VALUE = VALUE_COPIES | {"to", "type_as", "float", "double", "half", "bfloat16"}


def _value_source(node):
    """The first node, walking back through :data:`_SAME_VALUE` calls, whose value ``node`` has."""
    while (isinstance(node, Node) and node.op == "call_function" and target_name(node) in _SAME_VALUE and node.args
           and isinstance(node.args[0], Node) and _same_tensor_type(node, node.args[0])):
        node = node.args[0]
    return node


def _same_tensor_type(node: Node, source: Node) -> bool:
    after, before = example(node), example(source)
    return (isinstance(after, torch.Tensor) and isinstance(before, torch.Tensor) and after.dtype == before.dtype
            and after.device == before.device and after.shape == before.shape)


def _through(leaves: list[Node], state_nodes: list[Node], outputs: list[Node]) -> bool:
    """Whether every path from the state ``leaves`` to ``outputs`` passes through ``state_nodes`` (and no
    state node is a leaf itself, or a tuple of values)."""
    if any(not isinstance(node, Node) or node in leaves for node in state_nodes):
        return False
    reached, todo = set(), list(leaves)
    while todo:
        node = todo.pop()
        if node in reached or node in state_nodes:
            continue
        reached.add(node)
        todo.extend(node.users)
    return not any(output in reached for output in outputs)


def _module(graph: fx.Graph) -> fx.GraphModule:
    graph.lint()
    module = fx.GraphModule(torch.nn.Module(), graph, class_name="SeqparStep")
    module.recompile()
    return module


def _copy_segment(plan: Plan, seq: list[Node], root: torch.nn.Module) -> tuple[fx.Graph, list[Node], dict]:
    """``(graph, leaves, env)``: segment 0's state-dependent nodes copied into a new graph with the step's
    placeholders (``leaves``: the state's tensors; ``env``: segment node -> its copy), no output yet."""
    b = plan.begin
    graph = fx.Graph()
    state = state_placeholder(graph, plan.starts)
    slot_map: dict[tuple[int, int], Node] = {}
    per_step = [inp for inp in plan.inputs if inp.kind != "shared"]
    shared = [inp for inp in plan.inputs if inp.kind == "shared"]
    for index, inp in enumerate(per_step):
        source = inp.nodes[0] if inp.nodes else None
        ph = graph.placeholder(f"x{index}_{source.name}" if source is not None else f"x{index}_constant")
        if inp.kind == "slice":  # the slice P[start + l]; the views segment 0 takes of it are the step's
            ph.meta = dict(inp.views[0].meta)
            value = ph
            for view in inp.views[1:]:
                args, kwargs = fx.node.map_arg((view.args, view.kwargs), lambda _, value=value: value)
                value = copy_node(graph, view, args, kwargs, root)
        elif source is not None:
            ph.meta = dict(source.meta)
            value = ph
        else:
            ph.meta["example_value"] = torch.tensor(inp.values[0])
            value = ph
        for key in inp.slots:
            slot_map[key] = value
    for index, inp in enumerate(shared):
        ph = graph.placeholder(f"shared{index}_{inp.nodes[0].name}")
        ph.meta = dict(inp.nodes[0].meta)
        for key in inp.slots:
            slot_map[key] = ph
    leaves = state_tensors(graph, state, plan.starts)
    slot_map.update((key, leaves[index]) for key, index in plan.state_slots.items())
    env: dict[Node, Any] = {}
    for o in plan.dep_offsets:
        n = seq[b + o]

        def leaf(j, a, o=o):
            mapped = slot_map.get((o, j))
            if mapped is not None:
                return mapped
            if a.__class__ is Node:
                return a if a.op == "get_attr" else env[a]
            return a

        args, kwargs = rebuild_args((n.args, n.kwargs), leaf, [0])
        env[n] = copy_node(graph, n, args, kwargs, root, twin=mutates(n))
    return graph, leaves, env


def state_placeholder(graph: fx.Graph, starts: list[Node]) -> Node:
    """A step's first placeholder: the state, one tensor or the tuple of a tuple state (meta from ``starts``)."""
    state = graph.placeholder("state")
    state.meta = dict(starts[0].meta) if len(starts) == 1 else {"example_value": tuple(example(s0) for s0 in starts)}
    return state


def state_tensors(graph: fx.Graph, state: Node, starts: list[Node]) -> list[Node]:
    """The state's tensors inside the step: ``[state]``, or one ``getitem`` per tensor of a tuple state."""
    if len(starts) == 1:
        return [state]
    leaves = [graph.call_function(operator.getitem, (state, index)) for index in range(len(starts))]
    for leaf, s0 in zip(leaves, starts):
        leaf.meta = dict(s0.meta)
    return leaves


def copy_node(graph: fx.Graph, n: Node, args, kwargs, root: torch.nn.Module, twin: bool = False):
    """Copy ``n`` into ``graph`` with mapped arguments; returns a node or a tuple of nodes.

    ``twin``: ``n`` is an in-place op detection allowed (:mod:`.inplace`); its out-of-place twin is emitted.
    """
    operands = subgraph_call(n)
    if operands is not None:
        body = root.get_submodule(n.args[0].target)
        return inline_body(graph, body, list(args[operands:]))
    if n.op == "call_function" and n.target is operator.getitem and isinstance(args[0], tuple):
        return args[0][args[1]]
    op, target = n.op, n.target
    if twin:
        op, target, args, kwargs = out_of_place(op, target, args, kwargs)
    if op == "call_method":
        function = getattr(torch.Tensor, target, None)
        new = (graph.call_function(function, args, kwargs) if callable(function)
               else graph.call_method(target, args, kwargs))
    else:
        new = graph.create_node(op, target, args, kwargs, name=n.name)
    new.meta = dict(n.meta)
    return new


def inline_body(graph: fx.Graph, body: fx.GraphModule, operands: list) -> tuple:
    """Copy ``body``'s nodes into ``graph`` with its placeholders bound to ``operands``; returns the tuple of
    its outputs (the body of an ``invoke_subgraph``, ``tag_activation_checkpoint`` or ``scan`` call)."""
    env: dict[Node, Any] = {}
    operands = iter(operands)
    for n in body.graph.nodes:
        if n.op == "placeholder":
            env[n] = next(operands)
        elif n.op == "output":
            out = n.args[0]
            return tuple(env[x] if x.__class__ is Node else x for x in out) if isinstance(out, (tuple, list)) \
                else (env[out],)
        elif n.op == "get_attr":
            env[n] = n
        else:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda x: env[x] if x.op != "get_attr" else x)
            env[n] = copy_node(graph, n, args, kwargs, body)
    raise ValueError("subgraph body has no output")
