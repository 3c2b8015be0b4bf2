"""The producers of a kept-sequential chain's per-step inputs, moved into its step.

A loop often reads one slice per step of a large tensor that pointwise ops
computed for every step at once before the loop, broadcasting small tensors.
Mamba's discretisation:

    dA = exp(A[None, :, None, :] * dt[:, :, :, None])   # (B, d, L, N) from A (d, N) and dt (B, d, L)
    for l: s = dA[:, :, l] * s + dBu[:, :, l]

writes ``L d N`` values that the loop then reads once each, where the step
could compute its slice from slices of the small tensors. Selecting commutes
with pointwise ops and broadcasting: for ``Q = op(a, b, ..)`` of ``n`` dims,

    Q.select(k, i) = op(a', b', ..),   a' = a.select(k - (n - a.ndim), i)   where a varies along that dim,
                                       a' = a.select(k - (n - a.ndim), 0)   where it has size 1 there,
                                       a' = a                               where it has no such dim,

and a view that inserts dims (``R[None, :, None]``, ``unsqueeze``) selects
the source's matching dim, or takes the source whole where ``k`` is an
inserted dim. Applied from the per-step input's tensor ``P`` back through
its producers, this rewrites ``x_l = P.select(dim, start + stride l)`` as
ops on per-step slices of the tensors the producers started from (same
``dim``-mapped ``start`` and ``stride``) and on shared tensors.

:func:`absorb_producers` does that for the chains whose loop is compiled as
one step (:mod:`seqpar.runtime.fused_loop`): inductor fuses the absorbed ops
with the step, so the large tensor is never written. The values are those of
the same ops on the same numbers, evaluated per slice (the compiled kernels
round like any inductor code; the policy allows it only for contractive
chains, whose rounding errors do not grow). Only inference graphs are
changed: where grad is enabled and a value on the way requires grad, the
chain keeps its inputs (the graph's autograd differentiates the producers, as
in eager).

A *computed* per-step input (values ``x_l`` the graph computes at every step
from values that do not depend on the state, hoisted out of the step) is
stacked for all steps when the chain runs: xLSTM's memory update
``C_l = f_l C_{l-1} + i_l (k_l v_l^T)`` hands the chain ``L`` outer products of
``D E`` values each, where the step could make each from ``D + E``.
:func:`absorb_computed` takes the ops producing ``x_l`` that expand (their
result holds more values than the per-step values they read) into the step:
the chain then receives those smaller per-step values (and shared tensors),
and its step runs the same ops on them that the graph ran at step ``l``, so
the values are the graph's own, bit for bit, in every grad mode (the chain's
adjoint differentiates the ops with the rest of its step). Only chains kept
sequential take it: a parallel solve would run the ops at every evaluation.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.node import Node

from .batch_dims import POINTWISE
from .chain import Chain, ChainInput
from .effects import is_random, mutates
from .inplace import storages
from .step import copy_node
from .tokens import example, static_size, target_name

# Pointwise ops that broadcast their tensor arguments against each other (no random draws, no dtype-only
# arguments read for their type, no expansion to a given size).
_BROADCASTING = POINTWISE - {
    "dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d",
    "expand", "expand_as", "type_as", "type", "to",
}
# Absorb only where the producers expand: the per-step input's tensor holds at least this many times the values
# of the tensors the absorbed ops read (the memory the loop stops writing and reading).
MIN_EXPANSION = 2
# Producers followed back at most this far from the per-step input.
MAX_DEPTH = 16


class _Leaf:
    """A tensor the absorbed ops read: a per-step slice ``node.select(dim, start + stride l)`` (``dim`` set) or
    the whole ``node`` (shared by every step; ``pick`` selects index 0 of a size-1 dim, ``None`` keeps it)."""

    def __init__(self, node: Node, dim: int | None = None, pick: int | None = None):
        self.node, self.dim, self.pick = node, dim, pick


class _Call:
    """An absorbed op: ``node``'s call, selected on ``dim``, with the arguments ``args``/``kwargs`` in which
    :class:`_Leaf`/:class:`_Call` recipes replace the tensors."""

    def __init__(self, node: Node, dim: int, args, kwargs):
        self.node, self.dim, self.args, self.kwargs = node, dim, args, kwargs


class _PerStep:
    """A value the absorbed ops read that differs between steps: ``nodes[l]`` at step ``l`` (a computed per-step
    input of the rewritten chain)."""

    def __init__(self, nodes: list[Node]):
        self.nodes, self.node = nodes, nodes[0]


class _NotAbsorbable(Exception):
    pass


def absorb_producers(chain: Chain) -> list[str]:
    """Move the producers of ``chain``'s slice inputs into its step (and its per-step outputs' graph), in place.

    Returns the names of the ops absorbed (empty: nothing changed). A slice
    input is rewritten where its tensor is computed by pointwise ops and
    dim-inserting views, none of which is differentiated, draws random numbers or
    mutates, from tensors holding at most ``1 / MIN_EXPANSION`` of its values,
    and where nothing in the graph writes in place to a tensor it reads or
    recomputes (the step would read it at another time than the producers did).
    """
    plans, written = {}, None
    for position, item in enumerate(chain.per_step):
        if item.kind != "slice":
            continue
        try:
            recipe = _recipe(item.nodes[0], item.dim, 0)
        except _NotAbsorbable:
            continue
        parts = _parts(recipe)
        leaves = {part.node for part in parts if isinstance(part, _Leaf)}
        if not isinstance(recipe, _Call) or _numel(item.nodes[0]) < MIN_EXPANSION * sum(map(_numel, leaves)):
            continue  # nothing to absorb, or the producers do not expand
        written = _written_storages(item.nodes[0].graph) if written is None else written
        if any(key in written for part in parts for key in storages(example(part.node))):
            continue  # an in-place write changes a value the recipe reads or recomputes, at some point
        plans[position] = recipe
    if plans:
        _rewrite(chain, plans)
    names = (target_name(part.node) for recipe in plans.values() for part in _parts(recipe) if isinstance(part, _Call))
    return list(dict.fromkeys(names))


def absorb_computed(chain: Chain) -> list[str]:
    """Move the expanding producers of ``chain``'s computed per-step inputs into its step (and its per-step
    outputs' graph), in place; returns the names of the ops moved (empty: nothing changed).

    A computed input ``x_l = op(a_l, b_l, ..)`` is rewritten where ``op`` is
    the same call at every step (the same target and non-tensor arguments),
    neither draws random numbers nor mutates, and its result holds at least
    :data:`MIN_EXPANSION` times the values of the per-step tensors it is
    finally made from; an argument is followed back through the same kind of
    call while that call expands (``k_l[:, :, None] @ v_l[:, None, :]``), and
    is a new per-step input where it does not, or a shared tensor where it is
    the same value at every step. Nothing in the graph may write in place to
    a tensor those read (the chain reads them when it runs, not at step ``l``).
    """
    plans, written = {}, None
    for position, item in enumerate(chain.per_step):
        if item.kind != "computed" or len(set(item.nodes)) < len(item.nodes):
            continue
        try:
            recipe = _computed_recipe(item.nodes, 0)
        except _NotAbsorbable:
            continue
        leaves = [part for part in _parts(recipe) if isinstance(part, _PerStep)]
        per_step_values = sum(_numel(node) for node in dict.fromkeys(leaf.node for leaf in leaves))
        if not isinstance(recipe, _Call) or _numel(item.nodes[0]) < MIN_EXPANSION * per_step_values:
            continue
        written = _written_storages(item.nodes[0].graph) if written is None else written
        read = [node for part in _parts(recipe) if not isinstance(part, _Call)
                for node in getattr(part, "nodes", [part.node])]
        if any(key in written for node in read for key in storages(example(node))):
            continue
        plans[position] = recipe
    if plans:
        _rewrite(chain, plans)
    names = (target_name(part.node) for recipe in plans.values() for part in _parts(recipe) if isinstance(part, _Call))
    return list(dict.fromkeys(names))


def _computed_recipe(nodes: list[Node], depth: int):
    """How to compute ``nodes[l]`` in step ``l`` from per-step values and shared tensors (one call of the
    template ``nodes[0]`` with its arguments' recipes: :class:`_Call` with ``dim=None``). ``nodes`` differ between
    steps (a value shared by every step is a :class:`_Leaf`: :func:`_computed_argument`)."""
    first = nodes[0]
    if _tensor(first) is None:
        raise _NotAbsorbable(first.name)
    if depth > MAX_DEPTH or not _is_call(first) or is_random(first) or mutates(first):
        return _PerStep(nodes)
    flat, spec = pytree.tree_flatten((first.args, first.kwargs))
    columns = [flat]
    for node in nodes[1:]:
        other, other_spec = pytree.tree_flatten((node.args, node.kwargs))
        if node.op != first.op or node.target != first.target or other_spec != spec:
            return _PerStep(nodes)
        columns.append(other)
    arguments = []
    for values in zip(*columns):
        if not isinstance(values[0], Node):
            if any(isinstance(value, Node) or value != values[0] for value in values):
                return _PerStep(nodes)  # a constant that differs between steps (an index t)
            arguments.append(values[0])
        elif not all(isinstance(value, Node) for value in values):
            return _PerStep(nodes)
        else:
            arguments.append(_computed_argument(list(values), depth))
    args, kwargs = pytree.tree_unflatten(arguments, spec)
    return _Call(first, None, args, kwargs)


def _computed_argument(nodes: list[Node], depth: int):
    """An argument of an absorbed call: followed back where its own call expands, else a leaf."""
    first = nodes[0]
    if _tensor(first) is None:
        raise _NotAbsorbable(first.name)
    if all(node is first for node in nodes):
        return _Leaf(first)  # one value for every step: shared
    operands = [_numel(arg) for arg in first.all_input_nodes]
    if _is_call(first) and operands and _numel(first) >= MIN_EXPANSION * sum(operands):
        return _computed_recipe(nodes, depth + 1)
    return _PerStep(nodes)


def _written_storages(graph: fx.Graph) -> set:
    """The storages a node of ``graph`` writes in place (its first argument, or ``out=``)."""
    written = set()
    for node in graph.nodes:
        if mutates(node):
            for target in (node.args[0] if node.args else None, node.kwargs.get("out")):
                if isinstance(target, Node):
                    written.update(storages(example(target)))
    return written


def _parts(recipe) -> list:
    """``recipe`` and every :class:`_Call`/:class:`_Leaf`/:class:`_PerStep` in it, outermost first (with
    repeats)."""
    parts = [recipe]
    if isinstance(recipe, _Call):
        _map_recipes((recipe.args, recipe.kwargs), lambda part: parts.extend(_parts(part)))
    return parts


def _is_call(node: Node) -> bool:
    return node.op in ("call_function", "call_method")


def _numel(node: Node) -> int:
    value = example(node)
    return value.numel() if isinstance(value, torch.Tensor) else 1


def _tensor(node) -> torch.Tensor | None:
    value = example(node) if isinstance(node, Node) else None
    if isinstance(value, torch.Tensor) and all(static_size(size) is not None for size in value.shape):
        return value
    return None


def _recorded(value: torch.Tensor) -> bool:
    """Whether autograd records ops on ``value`` in this graph (it is compiled in the caller's grad mode)."""
    return value.requires_grad and torch.is_grad_enabled()


def _recipe(node: Node, dim: int, depth: int):
    """How to compute ``node.select(dim, i)`` from slices of the tensors ``node`` is computed from."""
    value = _tensor(node)
    if value is None:
        raise _NotAbsorbable(node.name)
    if depth > MAX_DEPTH or not _is_call(node) or _recorded(value) or is_random(node) or mutates(node):
        return _Leaf(node, dim)
    name = target_name(node)
    if name in _BROADCASTING or name in ("float", "double", "half", "bfloat16"):
        return _pointwise(node, value, dim, depth)
    if node.op == "call_function" and node.target is operator.getitem:
        return _indexed(node, dim, depth)
    if name == "unsqueeze":
        return _unsqueezed(node, value, dim, depth)
    return _Leaf(node, dim)


def _pointwise(node: Node, value: torch.Tensor, dim: int, depth: int) -> _Call:
    def select(arg):
        if not isinstance(arg, Node):
            return arg
        operand = _tensor(arg)
        if operand is None or _recorded(operand):
            raise _NotAbsorbable(arg.name)
        k = dim - (value.ndim - operand.ndim)
        if k < 0:
            return _Leaf(arg)
        if operand.shape[k] == value.shape[dim]:
            return _recipe(arg, k, depth + 1)
        if operand.shape[k] == 1:
            return _Leaf(arg, pick=k)
        raise _NotAbsorbable(arg.name)

    args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), select)
    return _Call(node, dim, args, kwargs)


def _index_entries(index, ndim: int) -> list | None:
    """``index`` (of a getitem) as a list of ``None`` / ``slice(None)`` entries over every source dim, or ``None``
    where it does anything else (an int, a tensor, a bounded slice)."""
    entries = list(index) if isinstance(index, tuple) else [index]
    if entries.count(Ellipsis) > 1 or any(
        entry is not None and entry is not Ellipsis and entry != slice(None) for entry in entries
    ):
        return None
    if Ellipsis in entries:
        at = entries.index(Ellipsis)
        covered = sum(entry is not None for entry in entries) - 1
        entries[at : at + 1] = [slice(None)] * (ndim - covered)
    covered = sum(entry is not None for entry in entries)
    return entries + [slice(None)] * (ndim - covered) if covered <= ndim else None


def _indexed(node: Node, dim: int, depth: int):
    """``R[index]`` with ``index`` inserting dims (``None``) and keeping others (``:``, ``...``)."""
    source, index = node.args
    operand = _tensor(source)
    entries = _index_entries(index, operand.ndim) if operand is not None else None
    if entries is None:
        return _Leaf(node, dim)
    source_dim = sum(entry is not None for entry in entries[:dim])
    rest = tuple(entries[:dim] + entries[dim + 1 :])
    inner = _Leaf(source) if entries[dim] is None else _recipe(source, source_dim, depth + 1)
    return _Call(node, dim, (inner, rest), {})


def _unsqueezed(node: Node, value: torch.Tensor, dim: int, depth: int):
    """``R.unsqueeze(d)``: ``R`` whole where ``dim == d``, else ``R``'s matching dim selected and ``d`` shifted."""
    source = node.args[0]
    inserted = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if not isinstance(inserted, int) or _tensor(source) is None:
        return _Leaf(node, dim)
    inserted %= value.ndim
    if inserted == dim:
        return _Leaf(source)
    source_dim, shifted = (dim, inserted - 1) if dim < inserted else (dim - 1, inserted)
    return _Call(node, dim, (_recipe(source, source_dim, depth + 1), shifted), {})


def _map_recipes(structure, fn):
    """``structure`` (args and kwargs) with ``fn`` applied to every :class:`_Leaf`/:class:`_Call` in it."""
    if isinstance(structure, (_Leaf, _Call, _PerStep)):
        return fn(structure)
    if isinstance(structure, tuple):
        return tuple(_map_recipes(item, fn) for item in structure)
    if isinstance(structure, list):
        return [_map_recipes(item, fn) for item in structure]
    if isinstance(structure, dict):
        return {key: _map_recipes(item, fn) for key, item in structure.items()}
    if isinstance(structure, slice):
        return slice(_map_recipes(structure.start, fn), _map_recipes(structure.stop, fn),
                     _map_recipes(structure.step, fn))
    return structure


def _slot_key(leaf, item: ChainInput) -> tuple:
    """Where the rewritten chain takes a leaf from: a computed per-step input (its nodes), a slice input (its
    tensor, dim, start and stride) or a shared input (its tensor)."""
    if isinstance(leaf, _PerStep):
        return ("computed", *leaf.nodes)
    return (leaf.node,) if leaf.dim is None else (leaf.node, leaf.dim, item.start, item.stride)


def _rewrite(chain: Chain, plans: dict) -> None:
    """Replace the planned per-step inputs (``plans``: position -> recipe) by the values their recipes read (new
    slice and computed inputs after the kept ones, new shared inputs after the old) and rebuild the step graphs
    on them."""
    template = chain.per_step
    kept = [position for position in range(len(template)) if position not in plans]
    per_step = [template[position] for position in kept]
    shared = list(chain.shared)
    slots: dict[tuple, int] = {}  # _slot_key -> per-step or shared slot
    for position, recipe in plans.items():
        item = template[position]
        for leaf in (part for part in _parts(recipe) if isinstance(part, (_Leaf, _PerStep))):
            key = _slot_key(leaf, item)
            if key in slots:
                continue
            if isinstance(leaf, _PerStep):
                per_step.append(ChainInput("computed", list(leaf.nodes)))
                slots[key] = len(per_step) - 1
            elif leaf.dim is None:
                if leaf.node not in shared:
                    shared.append(leaf.node)
                slots[key] = shared.index(leaf.node)
            else:
                per_step.append(ChainInput("slice", [leaf.node], start=item.start, dim=leaf.dim, stride=item.stride))
                slots[key] = len(per_step) - 1

    def rebuild(graph_module: fx.GraphModule) -> fx.GraphModule:
        old = [node for node in graph_module.graph.nodes if node.op == "placeholder"]
        graph = fx.Graph()
        state = graph.placeholder(old[0].name)
        xs = [graph.placeholder(f"x{index}_{item.nodes[0].name}" if item.nodes else f"x{index}_constant")
              for index, item in enumerate(per_step)]
        shares = [graph.placeholder(f"shared{index}_{node.name}") for index, node in enumerate(shared)]
        env = {old[0]: state}
        for index, position in enumerate(kept):
            env[old[1 + position]] = xs[index]
        for index in range(len(chain.shared)):
            env[old[1 + len(template) + index]] = shares[index]
        for old_node, new_node in env.items():
            new_node.meta = dict(old_node.meta)

        emitted = {}  # a producer two inputs share is computed once

        def emit(recipe, item):
            key = (type(recipe), recipe.node, getattr(recipe, "dim", None), getattr(recipe, "pick", None),
                   item.start, item.stride)
            if key not in emitted:
                emitted[key] = emit_new(recipe, item)
            return emitted[key]

        def emit_new(recipe, item):
            if isinstance(recipe, _PerStep):
                return xs[slots[_slot_key(recipe, item)]]
            if isinstance(recipe, _Leaf):
                if recipe.dim is not None:
                    return xs[slots[(recipe.node, recipe.dim, item.start, item.stride)]]
                whole = shares[slots[(recipe.node,)]]
                return whole if recipe.pick is None else graph.call_function(torch.select, (whole, recipe.pick, 0))
            args, kwargs = _map_recipes((recipe.args, recipe.kwargs), lambda part: emit(part, item))
            node = copy_node(graph, recipe.node, args, kwargs, graph_module)
            if recipe.dim is not None:
                node.meta = {}  # the producer's example value has every step; this node holds one
            return node

        for position, recipe in plans.items():
            env[old[1 + position]] = emit(recipe, template[position])
        graph.output(graph.graph_copy(graph_module.graph, env))
        rebuilt = fx.GraphModule(graph_module, graph)
        rebuilt.graph.eliminate_dead_code()
        rebuilt.recompile()
        return rebuilt

    chain.step = rebuild(chain.step)
    if chain.output_step is not None:
        chain.output_step = rebuild(chain.output_step)
    chain.per_step, chain.shared = per_step, shared
