"""Extend found chains at their ends by segments that compute the same step with other nodes.

Detection cuts segments by node tokens, so a segment that computes the
chain's step ``f`` with different nodes is left out of the chain:
  * Dynamo inlines the first call of a ``torch.compiler.nested_compile_region``
    and emits ``invoke_subgraph`` calls for the others, so the chain of calls
    starts at layer 1 and layer 0 computes ``chain.start = f(s, x_0)``;
  * Dynamo drops values the last step does not need: an ``nn.LSTMCell`` loop
    returning ``h`` computes the last ``(h, c)`` without taking ``c`` out.
``extend_chains(chains, gm)`` matches the nodes before ``chain.start`` and
after the chain's last state against the step's graph (:func:`match_step`) and
adds every segment that matches, one at a time, at either end.

A segment matches when its nodes compute exactly ``chain.step``'s state path:
the same targets (a ``call_method`` as its ``torch.Tensor`` function), the same
argument structure and literals, the same output shapes and dtypes, and its
other reads map the step's placeholders consistently: the state to the state
before the segment (the chain's last state, at the end), a per-step input to
a value of its kind (a placeholder of the same shape for ``"parameter"``, the
row ``P[a - 1]`` / ``P[a + L]`` for a ``"slice"``, a value that does not
depend on the state for ``"computed"``, a number for ``"constant"``), a shared
input to the very value the chain shares or to one that computes it again
(:func:`same_value`: T5's first block reads its own ``position_bias.contiguous()``
while detection shares block 1's with the later blocks), or a symbolic float
``t.item()`` where the chain shares ``t`` (:func:`~.segments.scalar_source`).
A per-step input that only the step's per-step outputs read is bound by
matching the outputs' path too, against the readers of the matched nodes
(:meth:`_Match.bind_output_inputs`); those nodes stay outside the segment and
compute the added step's outputs as before (RWKV's ``e1 * num`` of its output).
Guarantees for an extended chain
(besides those of :func:`~seqpar.passes.detect.find_chains`):
  * the added segment's nodes belong to no chain and only the segment reads
    them, except its output, the state (listed in ``used_outside`` where read
    after the chain);
  * none of the chain's inputs depends on an added segment before it, and an
    added per-step value depends on no state of the chain;
  * at the end, a state tensor the graph does not compute is ``None`` in the
    last output (the step computes it; nothing reads it) and the chain ends
    there.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.node import Node

from .chain import Chain, state_leaves
from .effects import side_effect
from .module_paths import varying_path
from .segments import scalar_source
from .slices import select_index
from .tokens import example, flatten_args, is_number, rebuild_args, target_name, value_signature


def extend_chains(chains: list[Chain], gm: fx.GraphModule) -> list[Chain]:
    """``chains`` (in graph order, in place), each extended at both ends while a segment matches its step."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    taken = {node for chain in chains for segment in chain.nodes for node in segment}
    for chain in chains:
        pattern = _Pattern(chain.step)
        while _extend(chain, pattern, order, taken, backward=True):
            pass
        while _extend(chain, pattern, order, taken, backward=False):
            pass
    return chains


class _Pattern:
    """The step's graph read as a pattern: its placeholders, state leaves, state-dependent nodes, outputs."""

    def __init__(self, step: fx.GraphModule):
        nodes = list(step.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        self.state = placeholders[0]
        self.inputs = placeholders[1:]  # per-step, then shared
        output = next(n for n in nodes if n.op == "output").args[0]
        self.outputs = list(output) if isinstance(output, (tuple, list)) else [output]
        self.tuple_state = isinstance(output, (tuple, list))
        # a tuple state's leaves are getitem(state, i); a tensor state is the placeholder itself
        self.leaf_of = {user: user.args[1] for user in self.state.users} if self.tuple_state else {self.state: 0}
        dependent = set(self.leaf_of) | {self.state}
        for n in nodes:
            if n.op == "call_function" and any(a in dependent for a in n.all_input_nodes):
                dependent.add(n)
        self.dependent = dependent
        self.size = sum(n.op == "call_function" for n in nodes)
        state_path = set()
        for n in reversed(nodes):
            if n.op == "output" or n in state_path:
                state_path.update(a for a in n.all_input_nodes if a in dependent)
        # the state-dependent nodes the next state does not need: the per-step outputs' path
        self.output_path = [n for n in nodes if n.op == "call_function" and n in dependent and n not in state_path]


class _Match:
    """One attempt to map the step's nodes onto graph nodes (``pairs``) and its placeholders onto values."""

    def __init__(self, pattern: _Pattern, chain: Chain):
        self.pattern, self.chain = pattern, chain
        self.pairs: dict[Node, Node] = {}
        self.used: dict[Node, Node] = {}
        self.outside: set[Node] = set()  # step nodes whose graph nodes stay outside the segment
        self.state: dict[int, Node] = {}
        self.inputs: dict[int, object] = {}
        self.per_step = len(chain.per_step)

    def match(self, s, g, reader: Node | None = None) -> bool:
        """Whether the step value ``s`` (a node or a literal) is the graph value ``g`` that the graph node
        ``reader`` reads, binding as it goes."""
        if s.__class__ is not Node:
            return g.__class__ is not Node and type(s) is type(g) and s == g
        pattern = self.pattern
        if s in pattern.leaf_of:
            return self._bind(self.state, pattern.leaf_of[s], g, node=True)
        if s.op == "placeholder":
            index = pattern.inputs.index(s)
            if index >= self.per_step:
                shared = self.chain.shared[index - self.per_step]
                return same_value(g, shared) or (
                    reader is not None and g.__class__ is Node and scalar_source(reader, g) is shared)
            return self._bind(self.inputs, index, g, node=self.chain.per_step[index].kind != "constant")
        if s.graph is not pattern.state.graph or s.op == "get_attr":
            return g is s  # a get_attr node of the original graph that the step refers to
        if g.__class__ is not Node or _canonical(s) != _canonical(g):
            return False
        if s in self.pairs or g in self.used:
            return self.pairs.get(s) is g
        if value_signature(example(s)) != value_signature(example(g)):
            return False
        arguments = ((s.args, s.kwargs), (g.args, g.kwargs))
        if _structure(arguments[0]) != _structure(arguments[1]):
            return False
        self.pairs[s], self.used[g] = g, s
        return all(self.match(a, b, g) for a, b in zip(*(flatten_args(arg, []) for arg in arguments)))

    @staticmethod
    def _bind(bindings: dict, key, g, node: bool) -> bool:
        if (g.__class__ is Node) != node or (not node and not is_number(g)):
            return False
        if key in bindings:
            return bindings[key] is g or (not node and type(bindings[key]) is type(g) and bindings[key] == g)
        bindings[key] = g
        return True

    def segment(self) -> list[Node]:
        """The graph nodes the step's state path maps to: the added segment's nodes."""
        return [g for s, g in self.pairs.items() if s in self.pattern.dependent and s not in self.outside]

    def bind_output_inputs(self, order: dict) -> _Match | None:
        """This match with the per-step inputs bound that only the step's per-step outputs read, or ``None``.

        The output path's nodes are matched, in step order, against the readers of the graph nodes their
        state-dependent arguments map to; they stay outside the segment (the graph computes that step's
        outputs from the chain's states as before). Only the state path is needed otherwise."""
        match = self
        if len(match.inputs) == match.per_step:
            return match
        for s in match.pattern.output_path:
            readers = {reader for a in s.all_input_nodes for g in [match._graph_value(a)] if g is not None
                       for reader in g.users}
            found, match = _match_one_of(match, s, sorted(readers, key=lambda node: order.get(node, -1)))
            if found is None:
                return None
            match.outside.add(s)
        return match if len(match.inputs) == match.per_step else None

    def _graph_value(self, s: Node) -> Node | None:
        """The graph node the step node ``s`` maps to so far (a state leaf through the state's binding)."""
        if s in self.pattern.leaf_of:
            return self.state.get(self.pattern.leaf_of[s])
        return self.pairs.get(s)


# Calls whose results are not determined by their arguments (two calls need not hold equal values).
_UNINITIALISED = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


def same_value(g, shared: Node, depth: int = 8) -> bool:
    """Whether ``g`` is ``shared``, or the same side-effect-free calls of the same values (up to ``depth`` deep:
    T5's decoder blocks each compute ``where(causal_mask, bias, -inf).contiguous()`` from their own ``arange``)."""
    if g is shared:
        return True
    if depth == 0 or g.__class__ is not Node or g.op not in ("call_function", "call_method") \
            or _canonical(g) != _canonical(shared) or g.is_impure() or side_effect(g, True) \
            or side_effect(shared, True) or target_name(g) in _UNINITIALISED:
        return False
    if value_signature(example(g)) != value_signature(example(shared)):
        return False
    arguments = ((g.args, g.kwargs), (shared.args, shared.kwargs))
    if _structure(arguments[0]) != _structure(arguments[1]):
        return False
    return all(same_value(a, b, depth - 1) if b.__class__ is Node
               else a.__class__ is not Node and type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b
               for a, b in zip(*(flatten_args(arg, []) for arg in arguments)))


def _canonical(node: Node):
    """``(op, target)`` with a ``call_method`` as the ``torch.Tensor`` function the step calls instead."""
    if node.op == "call_method":
        function = getattr(torch.Tensor, node.target, None)
        if callable(function):
            return ("call_function", function)
    return (node.op, node.target)


def _structure(arguments):
    """The nesting of an argument structure with every leaf blanked out."""
    return rebuild_args(arguments, lambda j, a: None, [0])


def _extend(chain: Chain, pattern: _Pattern, order: dict, taken: set, backward: bool) -> bool:
    """Add one matching segment before (``backward``) or after the chain; whether one was added."""
    if backward:
        found = _match_before(chain, pattern)
    else:
        if any(leaf is None for leaf in state_leaves(chain.outputs[-1])):
            return False  # the last state is not all there: nothing can follow it
        found = _match_after(chain, pattern, order)
    if found is None:
        return False
    match, outputs = found
    match = match.bind_output_inputs(order)
    if match is None:
        return False
    segment = sorted(match.segment(), key=order.__getitem__)
    if not _segment_ok(chain, match, segment, outputs, order, taken, backward):
        return False
    members = {node for nodes in chain.nodes for node in nodes} | set(segment)
    if backward:
        old_start = chain.start
        chain.start = _state([match.state[i] for i in range(len(pattern.outputs))], pattern)
        read_after = any(user not in members for leaf in state_leaves(old_start) for user in leaf.users)
        chain.used_outside = [0] * read_after + [k + 1 for k in chain.used_outside]
        chain.outputs.insert(0, old_start)
        for outputs_j in chain.per_step_outputs:  # only the state of an added segment is read after it
            outputs_j.insert(0, None)
        chain.nodes.insert(0, segment)
        chain.modules.insert(0, _module(segment, chain.nodes[1]))
    else:
        last = chain.length - 1
        if any(user not in members for leaf in state_leaves(chain.outputs[-1]) for user in leaf.users):
            chain.used_outside.append(last)
        chain.outputs.append(_state(outputs, pattern))
        for outputs_j in chain.per_step_outputs:
            outputs_j.append(None)
        chain.nodes.append(segment)
        chain.modules.append(_module(segment, chain.nodes[-2]))
    for index, item in enumerate(chain.per_step):
        value = match.inputs[index]
        if item.kind == "slice":
            item.start -= item.stride * backward
        elif item.kind == "constant":
            item.values.insert(0, value) if backward else item.values.append(value)
        else:
            item.nodes.insert(0, value) if backward else item.nodes.append(value)
    taken.update(segment)
    return True


def _state(leaves: list, pattern: _Pattern):
    return tuple(leaves) if pattern.tuple_state else leaves[0]


def _match_before(chain: Chain, pattern: _Pattern):
    """The match of a segment whose outputs are ``chain.start``, or ``None``."""
    match = _Match(pattern, chain)
    start = state_leaves(chain.start)
    if not all(match.match(s, g) for s, g in zip(pattern.outputs, start)):
        return None
    if len(match.state) != len(start):
        return None
    return match, start


def _match_after(chain: Chain, pattern: _Pattern, order: dict):
    """The match of a segment that reads the chain's last state and computes some of the next, or ``None``.

    Candidates for each output are the graph nodes shortly after the chain;
    an output no candidate matches is not computed by the graph (``None``).
    """
    last = max(order[node] for node in chain.nodes[-1])
    window = [node for node in list(order)[last + 1: last + 2 * pattern.size + 8] if node.op == "call_function"
              or node.op == "call_method"]
    match = _Match(pattern, chain)
    outputs = []
    for s in pattern.outputs:
        found, match = _match_one_of(match, s, window)
        outputs.append(found)
    if all(g is None for g in outputs):
        return None
    previous = state_leaves(chain.outputs[-1])
    if not match.state or any(previous[i] is not g for i, g in match.state.items()):
        return None
    return match, outputs


def _match_one_of(match: _Match, s: Node, candidates) -> tuple[Node | None, _Match]:
    """The first of ``candidates`` (graph nodes, none of them matched yet) that the step node ``s`` matches, with
    ``match`` extended by it; ``(None, match)`` where none does."""
    for g in candidates:
        if g in match.used or _canonical(g) != _canonical(s):
            continue
        attempt = _copy(match)
        if attempt.match(s, g):
            return g, attempt
    return None, match


def _copy(match: _Match) -> _Match:
    other = _Match(match.pattern, match.chain)
    other.pairs, other.used = dict(match.pairs), dict(match.used)
    other.state, other.inputs = dict(match.state), dict(match.inputs)
    other.outside = set(match.outside)
    return other


def _segment_ok(chain: Chain, match: _Match, segment: list[Node], outputs: list, order: dict, taken: set,
                backward: bool) -> bool:
    """Whether the matched segment can join the chain (see the module docstring's guarantees)."""
    if any(node in taken for node in segment) or len(match.inputs) != len(chain.per_step):
        return False
    own = set(segment)
    kept = {g for g in outputs if g is not None}
    if any(user not in own for node in segment if node not in kept for user in node.users):
        return False  # a value inside the segment is read elsewhere
    if backward:
        start = [match.state[i] for i in sorted(match.state)]
        before = state_leaves(chain.start)
        if any(node in own or value_signature(example(node)) != value_signature(example(old))
               for node, old in zip(start, before)):
            return False
        roots = start
    else:
        roots = state_leaves(chain.start)
    for index, item in enumerate(chain.per_step):
        value = match.inputs[index]
        if item.kind == "constant":
            if type(value) is not type(item.values[0]):
                return False
        elif item.kind == "slice":
            wanted = item.start + item.stride * (-1 if backward else chain.length)
            if select_index(value) != (item.nodes[0], item.dim, wanted):
                return False
        else:
            reference = item.nodes[0]
            if value in own or value_signature(example(value)) != value_signature(example(reference)):
                return False
            if item.kind == "parameter" and value.op != "placeholder":
                return False
            if item.kind == "computed" and _depends(value, roots, order):
                return False
    if backward:  # the chain's inputs must not be computed from the added segment
        inputs = {node for item in chain.per_step if item.kind != "constant" for node in item.nodes}
        inputs |= set(chain.shared)
        members = {node for nodes in chain.nodes for node in nodes}
        seen, todo = set(), [user for node in segment for user in node.users if user not in own]
        while todo:
            node = todo.pop()
            if node in seen or node in members:
                continue
            if node in inputs:
                return False
            seen.add(node)
            todo.extend(node.users)
    return True


def _depends(node: Node, roots: list[Node], order: dict) -> bool:
    """Whether ``node`` is computed from any of ``roots``."""
    roots = set(roots)
    floor = min(order[root] for root in roots)
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current in roots:
            return True
        if current in seen or order[current] < floor:
            continue
        seen.add(current)
        todo.extend(current.all_input_nodes)
    return False


def _module(segment: list[Node], neighbour: list[Node]) -> str:
    """The module that differs between the added segment and its neighbour (``layers.0``), or ``""``."""
    for a in segment:
        for b in neighbour:
            path = varying_path(a, b)
            if path:
                return path
    return ""
