"""Stacks of per-step copies of one computation, made one batched computation.

A rewritten chain reads its per-step inputs as ``torch.stack([x_0, .., x_{L-1}])``
(:mod:`.inputs`), and a chain's solved states and per-step outputs reach the
next chain as ``L`` selects that are stacked again. Each ``x_l`` was computed
in the unrolled loop, ``L`` copies of one small graph: RWKV's
``x_l = key[:, l].float() + u``. Left so, the inner compiler gets a graph of
``O(L)`` nodes (minutes of inductor for ``L = 256``) to do what one batched
op does. :func:`batch_stacks` replaces such a stack by

    stack_l f(P.select(d, a + k l), c) = f~(slice_steps(P, d, a, k, L), c)       (L, *S)

where ``P.select(d, a + k l)`` are the steps' slices of one tensor (an
arithmetic progression of indexes, :func:`~.slices.as_slice`; or a basic
index with such an int, ``P[:, t, None]``, which is ``slice_steps(P, ..)[:, :, None]``), ``c`` the
operands every copy shares (the same node or literal), and ``f~`` the same ops
applied once to the stacked operands: a pointwise op (:data:`BATCHABLE`)
broadcasts ``(L, 1, .., 1, *s_j)`` against shared operands of at most the
per-step rank ``r = len(S)`` exactly as ``s_j`` broadcast in each step, so
row ``l`` of ``f~`` is ``f`` at step ``l``; ``linear`` maps the leading dims of
its input independently; ``matmul`` of operands of rank >= 2 broadcasts its
batch dims the same way (xLSTM's outer products ``k_l[..., None] @ v_l[..., None, :]``).
Guarantees: each replaced stack equals the original in values, shape and
dtype; every batched node is run on Dynamo's fake values and must give
``(L, *shape)`` and the dtype of the copy it batches (a rank-0 operand
promotes types more weakly than its stack: such a mismatch leaves the stack
as it was); ops that mutate, draw random numbers or touch global state
(:func:`~.effects.side_effect`) are never batched, nor a stack whose copies
have an in-place write between them and the stack (the batched ops run at
the stack: they could read what the write changed); the per-step copies are
erased once nothing else reads them.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.node import Node

from ..runtime.slicing import slice_steps
from .batch_dims import POINTWISE
from .effects import mutates, side_effect
from .slices import as_slice, basic_index, indexed_select, progression
from .tokens import call_arg, example, flatten_args, node_token, rebuild_args, target_name

log = logging.getLogger("seqpar.passes")

# Ops whose L copies equal one call on the stacked operands, by how the call changes: pointwise ops broadcast
# (shape-taking ``expand`` excluded), as ``matmul`` broadcasts its batch dims where its varying operands are
# matrices (rank >= 2 per step: a vector operand would become a matrix), ``linear`` maps leading dims, a
# reshape gets the step dim in front of its shape, a dim-taking op its dims (non-negative ones) moved up by one,
# a basic index (ints, slices, ``None``, ``...``) a full slice in front.
POINTWISE_BATCHABLE = POINTWISE - {"expand", "expand_as"}
_MATMUL = {"matmul", "__matmul__"}
_BROADCASTING = POINTWISE_BATCHABLE | _MATMUL
_LEADING = {"linear"}
_RESHAPES = {"reshape", "view"}
_DIMMED = {"unsqueeze", "squeeze", "transpose", "flatten", "softmax", "log_softmax", "sum", "mean", "amax", "amin"}
_INDEXED = {"getitem"}
BATCHABLE = _BROADCASTING | _LEADING | _RESHAPES | _DIMMED | _INDEXED
_DIM_KEYWORDS = {"dim", "dim0", "dim1", "start_dim", "end_dim"}
# Values of a stack left outside its run of batched copies (steps peeled before a chain) at most.
_MAX_STRIPPED = 2


@dataclass(eq=False)
class _Slices:
    """``stack_l source.select(dim, start + stride l)[:, .., :, *rest]`` (``dim`` full slices; ``rest`` empty for
    a plain select); ``column`` the ``L`` nodes."""

    source: Node
    dim: int
    start: int
    stride: int
    column: tuple
    rest: tuple = ()


@dataclass(eq=False)
class _Batched:
    """``stack_l template(leaves_l)``: ``operands[j]`` is a plan for leaf ``j``'s column, ``None`` where shared;
    ``column`` the ``L`` nodes replaced (erased once unread)."""

    template: Node
    operands: list
    column: tuple


def batch_stacks(gm: fx.GraphModule) -> int:
    """Replace each ``torch.stack`` of per-step copies of one computation by the batched computation (see the
    module docstring); the number of stacks replaced."""
    plans: dict[tuple, object] = {}
    replaced, copies = 0, []
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    writes = [order[node] for node in gm.graph.nodes if mutates(node) or node.op == "call_module"]
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is torch.stack):
            continue
        column, dim = node.args[0], call_arg(node, 1, "dim", 0)
        if not isinstance(column, (list, tuple)) or len(column) < 2 or not all(isinstance(n, Node) for n in column) \
                or not isinstance(dim, int):
            continue
        split = _split(tuple(column), plans)
        if split is not None:
            first = min(order[copy] for copy in _copies(split[1]))
            if any(first < index < order[node] for index in writes):  # the copies might read what it writes
                log.debug("seqpar: stack %s left unbatched: a tensor may be written in place among its copies",
                          node.name)
                continue
        batched = None if split is None else _emit(gm.graph, node, *split, dim)
        if batched is None:
            continue
        node.replace_all_uses_with(batched)
        gm.graph.erase_node(node)
        replaced += 1
        copies.append(split[1])
    _erase_unread(gm.graph, copies)
    if replaced:
        gm.graph.lint()
        gm.recompile()
        log.debug("seqpar: %d stacks of per-step copies batched", replaced)
    return replaced


def _split(column: tuple, plans: dict) -> tuple[tuple, object, int, tuple] | None:
    """``(head, plan, length, tail)``: ``column`` as a few values before and after a run of ``length >= 2``
    per-step copies that ``plan`` computes at once (a chain's states after the steps peeled before it), the
    fewest such values first; ``None`` where there is no such run."""
    for stripped in range(_MAX_STRIPPED + 1):
        for head in range(stripped + 1):
            tail = len(column) - (stripped - head)
            if tail - head >= 2:
                plan = _plan(column[head:tail], plans)
                if plan is not None:
                    return column[:head], plan, tail - head, column[tail:]
    return None


def _plan(column: tuple, plans: dict):
    """How to compute ``stack(column)`` at once, or ``None``; memoised per column."""
    if column not in plans:
        plans[column] = _slices(column) or _batched(column, plans)
    return plans[column]


def _slices(column: tuple) -> _Slices | None:
    """The column as evenly spaced selects of one tensor (:func:`~.slices.as_slice` without views: a view of
    the selects is batched as an op), or as one basic index with an evenly spaced int (xLSTM's
    ``f[:, :, t, None]``: :func:`~.slices.indexed_select`)."""
    found = as_slice(list(column))
    if found is not None and len(found.chain) == 1:
        return _Slices(found.source, found.dim, found.start, found.stride, column)
    picked = [indexed_select(node) for node in column]
    steps = progression(picked)
    if steps is None or any(p[3] != picked[0][3] for p in picked):
        return None
    return _Slices(*steps, column, picked[0][3])


def _batched(column: tuple, plans: dict) -> _Batched | None:
    first = column[0]
    name = target_name(first) if first.op in ("call_function", "call_method") else None
    if name not in BATCHABLE or side_effect(first, on_state=True) is not None:
        return None
    token = node_token(first)
    if any(node_token(node) != token for node in column):
        return None
    rank = _rank(first)
    leaves = [flatten_args((node.args, node.kwargs), []) for node in column]
    operands = []
    for j, value in enumerate(leaves[0]):
        values = [row[j] for row in leaves]
        if all(v is value for v in values) or (not isinstance(value, Node) and all(v == value for v in values)):
            operands.append(None)
            continue
        if not all(isinstance(v, Node) for v in values) or rank is None:
            return None
        operand_rank = _rank(value)
        aligned = operand_rank is not None and (operand_rank <= rank or name not in _BROADCASTING) and (
            name not in _MATMUL or operand_rank >= 2)
        plan = _plan(tuple(values), plans) if aligned else None
        if plan is None:
            return None
        operands.append(plan)
    varying = [j for j, operand in enumerate(operands) if operand is not None]
    if not varying or (name not in _BROADCASTING and varying != [0]):
        return None
    if name in _RESHAPES and not all(type(leaf) is int for leaf in leaves[0][1:]):
        return None  # a shape of literal ints, nothing else (``view(dtype)`` reinterprets bytes)
    if name in _DIMMED and (any(isinstance(leaf, Node) for leaf in leaves[0][1:])
                            or (name != "squeeze" and not _given_dims(first))):
        return None  # dims given as literals; a default dim (all of them, or 0) would take in the step dim
    if name in _INDEXED and not (isinstance(example(first), torch.Tensor) and basic_index(first.args[1])):
        return None  # advanced indexing (tensors, lists) does not keep a leading dim where it is
    return _Batched(first, operands, column)


def _given_dims(node: Node) -> list[int]:
    """The dims a dim-taking call names: int literals after its input, or under a dim keyword."""
    given = list(node.args[1:]) + [value for key, value in node.kwargs.items() if key in _DIM_KEYWORDS]
    return [dim for dim in flatten_args(given, []) if type(dim) is int]


def _rank(node: Node) -> int | None:
    value = example(node)
    return value.ndim if isinstance(value, torch.Tensor) else None


def _emit(graph: fx.Graph, stack: Node, head: tuple, plan, length: int, tail: tuple, dim: int) -> Node | None:
    """``stack`` computed as ``cat([*head, plan for length steps, *tail])``, moved to its ``dim``, inserted
    before it; ``None`` (nothing left inserted) where the fake values do not match the stack's."""
    expected = example(stack)
    fake_mode = getattr(expected, "fake_mode", None)
    if fake_mode is None:
        return None
    emitted: list[Node] = []
    try:
        with graph.inserting_before(stack), fake_mode:
            out = _emit_plan(graph, plan, length, emitted, {})
            if head or tail:
                rows = [_node(graph, emitted, "call_method", "unsqueeze", (node, 0)) for node in head]
                rows += [out] + [_node(graph, emitted, "call_method", "unsqueeze", (node, 0)) for node in tail]
                out = _node(graph, emitted, "call_function", torch.cat, (rows,))
            ndim = example(out).ndim
            if dim % ndim:
                out = _node(graph, emitted, "call_function", torch.movedim, (out, 0, dim % ndim))
            out = _node(graph, emitted, "call_method", "contiguous", (out,))
        value = example(out)
        if value.shape != expected.shape or value.dtype != expected.dtype:
            raise ValueError(f"batched {tuple(value.shape)} {value.dtype} != {tuple(expected.shape)} "
                             f"{expected.dtype}")
    except Exception as error:
        log.debug("seqpar: stack %s left unbatched: %s: %s", stack.name, type(error).__name__, error)
        for node in reversed(emitted):
            graph.erase_node(node)
        return None
    return out


def _emit_plan(graph: fx.Graph, plan, length: int, emitted: list, done: dict) -> Node:
    if id(plan) in done:
        return done[id(plan)]
    if isinstance(plan, _Slices):
        out = _node(graph, emitted, "call_function", slice_steps,
                    (plan.source, plan.dim, plan.start, plan.stride, length))
        if plan.rest:  # the step dim in front, then the selected tensor's index
            index = (slice(None),) * (plan.dim + 1) + plan.rest
            out = _node(graph, emitted, "call_function", operator.getitem, (out, index))
    else:
        template, rank = plan.template, _rank(plan.template)
        broadcasts = target_name(template) in _BROADCASTING
        operands = {}
        for j, operand in enumerate(plan.operands):
            if operand is not None:
                batched = _emit_plan(graph, operand, length, emitted, done)
                for _ in range(rank - (example(batched).ndim - 1) if broadcasts else 0):  # per-step dims right
                    batched = _node(graph, emitted, "call_method", "unsqueeze", (batched, 1))
                operands[j] = batched
        args, kwargs = rebuild_args((template.args, template.kwargs),
                                    lambda j, value: operands.get(j, value), [0])
        args, kwargs = _with_step_dim(target_name(template), tuple(args), dict(kwargs), length)
        out = _node(graph, emitted, template.op, template.target, args, kwargs)
    value, copy = example(out), example(plan.column[0])
    if value.shape != (length, *copy.shape) or value.dtype != copy.dtype:
        raise ValueError(f"{out.name}: batched {tuple(value.shape)} {value.dtype}, per step {tuple(copy.shape)} "
                         f"{copy.dtype}")
    done[id(plan)] = out
    return out


def _with_step_dim(name: str, args: tuple, kwargs: dict, length: int) -> tuple[tuple, dict]:
    """A call's arguments made to act on a leading step dim: ``reshape(x, shape) -> reshape(X, (L, *shape))``;
    ``op(x, d) -> op(X, d + 1)`` for ``d >= 0`` (``d < 0`` counts from the end, unchanged)."""
    if name in _RESHAPES:
        if "shape" in kwargs:
            return args, {**kwargs, "shape": (length, *kwargs["shape"])}
        shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        return (args[0], (length, *shape)), kwargs
    if name in _INDEXED:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return (args[0], (slice(None), *index)), kwargs
    if name in _DIMMED:
        return ((args[0], *(_shifted(arg) for arg in args[1:])),
                {key: _shifted(value) if key in _DIM_KEYWORDS else value for key, value in kwargs.items()})
    return args, kwargs


def _shifted(dims):
    if isinstance(dims, (tuple, list)):
        return type(dims)(_shifted(dim) for dim in dims)
    return dims + 1 if type(dims) is int and dims >= 0 else dims


def _node(graph: fx.Graph, emitted: list, op: str, target, args: tuple, kwargs: dict | None = None) -> Node:
    """A new node with its fake value (run now on its operands' fake values, inside the caller's fake mode)."""
    node = graph.create_node(op, target, args, kwargs or {})
    emitted.append(node)
    values = fx.node.map_arg((args, kwargs or {}), example)
    call_args, call_kwargs = values
    function = getattr(call_args[0], target) if op == "call_method" else target
    node.meta["example_value"] = function(*(call_args[1:] if op == "call_method" else call_args), **call_kwargs)
    return node


def _copies(plan) -> dict[Node, None]:
    """The per-step nodes ``plan`` replaces: its columns and its operands' (ordered, without repeats)."""
    nodes = dict.fromkeys(plan.column)
    if isinstance(plan, _Batched):
        for operand in plan.operands:
            if operand is not None:
                nodes.update(_copies(operand))
    return nodes


def _erase_unread(graph: fx.Graph, plans: list) -> None:
    """Erase the per-step copies the batched stacks replaced, last first, where nothing else reads them."""
    copies: dict[Node, None] = {}
    for plan in plans:
        copies.update(_copies(plan))
    order = {node: index for index, node in enumerate(graph.nodes)}
    for node in sorted(copies, key=order.__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)
