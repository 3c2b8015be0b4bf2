"""Per-step writes into one buffer, moved after the loop: ``buf[:, t] = y_t`` becomes one write of all ``y``.

A recurrence that fills a preallocated buffer step by step (RWKV's
``output[:, t] = ...``, RecurrentGemma's ``contextualized_states[:, t] =
...``) mutates a tensor inside every segment, which no chain may do. When
nothing reads the buffer between its first and its last write, the ``n``
writes of ``y_i`` into the slot at position ``a + k i`` of one dim ``d``
equal one write after the last,

    buf[.., a : a + k n : k, ..] = stack([y_0, .., y_{n-1}], d)

(``cat`` for ``stack`` where every slot keeps dim ``d`` at size 1, and every
``y_i`` with it; for ``k < 0`` the values are stacked in reverse and written
with step ``-k``): every ``y_i`` is read after the segments, a per-step
output (:mod:`.segments`), and the chain op serves a stack as one view
(:mod:`.rewrite`; a ``cat`` reads its per-step selects).
:func:`sink_buffer_writes` does this for every buffer whose writes qualify.

Each write is read from its form (those Dynamo traces in torch 2.13) as one
:class:`Write`, the value and the slot (a dim and a position):

  * ``setitem(buf, index, y)``: ``buf[:, t] = y``;
  * ``copy_(view, y)`` (the method, ``torch.ops.aten.copy_``) through a view
    of ``buf`` that nothing else reads: ``buf[index]`` by basic indexing,
    ``buf.select(d, t)``, ``buf.narrow(d, t, 1)`` (methods or functions):
    ``buf[:, t].copy_(y)``, ``buf[t].copy_(y)``;
  * ``buf.index_put_((i,), y)`` (or ``torch.index_put_``), not accumulating:
    ``buf[i] = y``, dim 0;
  * ``buf.index_copy_(d, i, y)``, ``i`` in ``[0, size)``;

where ``index`` is one position item among full slices ``:`` (and at most
one ``...``), and a position item is an int, a slice ``a:a+1``, a list ``[a]``
or a constant index tensor ``i``: built in the graph from Python ints
(``torch.tensor(a)``, ``torch.tensor([a])``, ``torch.full((1,), a)``, or an
int or slice of such a tensor or of ``torch.arange(..)``), of an int dtype,
0-d or of one element, and written to by nothing. An int, a 0-d tensor and
``select`` drop dim ``d`` from the slot; a slice, a list, a one-element
tensor, ``narrow`` and ``index_copy_`` keep it at size 1.

The ``n >= 2`` writes into one buffer node move when

  * all are at one dim, all drop it or all keep it, the positions (taken
    modulo the dim's size, within ``[-size, size)``) evenly spaced, distinct;
  * every ``y`` is a tensor of exactly the slot's shape (no broadcasting), of
    one dtype, no alias of the buffer, and nothing writes to it (or an alias)
    between its write and the last; ``setitem`` and ``copy_`` convert ``y`` to
    the buffer's dtype element by element, as the moved ``setitem`` does;
    ``index_put_`` and ``index_copy_`` of another dtype raise in eager and stay;
  * no node but the writes reads ``buf`` or an alias of it between the first
    write and the last (the buffer's value there is never observed), nothing
    reads what a write returns, and every such node has an example value
    (aliasing is read from them).

The graph then computes the same values: the buffer holds the same numbers
after the last write, and nothing could see it in between. The writes' views
and constant indexes, read by nothing else, go with them.

Left as they are (a chain through them is then rejected for writing in place):

  * ``index_put_(.., accumulate=True)``: it adds to the slot;
  * index tensors computed from data or graph inputs, of several elements or
    of a bool dtype (a mask): no single position known when compiling;
  * ``index_copy_`` at a negative position: eager raises, the moved write
    would not;
  * ``buf[i].copy_(y)`` with an index tensor or list: no write into ``buf``
    (the index copies, and ``copy_`` writes into the copy);
  * several positions (``buf[t, s] = y``), ``None`` in an index, views of
    views (``buf[t][0].copy_(y)``) and ``copy_(.., non_blocking=True)``: not
    one slot of one buffer node written as above;
  * buffers of symbolic size along the written dim: no positions to compare.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
from torch.fx.node import Node

from .effects import mutates
from .inplace import Aliases
from .tokens import call_arg, example, hashable, static_size

_FULL = slice(None, None, None)
_INDEX_DTYPES = (torch.int64, torch.int32)
_FACTORY_KWARGS = {"dtype", "device"}  # all other arguments are positional ints (see _constant_ints)


@dataclass(frozen=True)
class Write:
    """``buffer``'s slot at ``position`` of dim ``dim`` set to ``value``; ``keepdim``: the slot keeps dim ``dim``
    at size 1. ``nodes``: the nodes that make the write (the view it writes through, its constant index), the
    writing one last."""

    buffer: Node
    dim: int
    position: int
    keepdim: bool
    value: Node
    nodes: tuple[Node, ...]


def sink_buffer_writes(gm: fx.GraphModule) -> int:
    """Move every qualifying group of per-step buffer writes after its last write (in place); how many moved."""
    graph = gm.graph
    candidates = [node for node in graph.nodes if _recogniser(node) is not None]
    if len(candidates) < 2:
        return 0
    aliases = Aliases(graph)  # a moved group adds a stack (a new tensor) and a write (no value): still valid
    groups: dict[Node, list[Write]] = {}
    for node in candidates:
        write = _recogniser(node)(node, aliases)
        if write is not None:
            groups.setdefault(write.buffer, []).append(write)
    moved = 0
    for group in groups.values():
        position = {node: index for index, node in enumerate(graph.nodes)}  # with the nodes earlier moves added
        plan = _plan(group, position, aliases) if len(group) >= 2 else None
        if plan is not None:
            _sink(graph, group, position, *plan)
            moved += 1
    if moved:
        graph.lint()
        gm.recompile()
    return moved


def _recogniser(node: Node):
    """The function that reads ``node`` as a :class:`Write`, for the calls that may write a slot; else ``None``."""
    if node.op not in ("call_function", "call_method") or node.users or not hashable(node.target):
        return None  # what a write returns (the buffer, or the view it wrote) must be read by nothing: it goes
    return _RECOGNISERS.get(node.target)


def _setitem(node: Node, aliases: Aliases) -> Write | None:
    """``buf[index] = y``."""
    if node.kwargs or len(node.args) != 3:
        return None
    buffer, index, value = node.args
    return _indexed(buffer, index, value, node, aliases)


def _copy(node: Node, aliases: Aliases) -> Write | None:
    """``view.copy_(y)`` through a view ``buf[index]`` (basic indexing), ``buf.select(d, t)`` or
    ``buf.narrow(d, t, 1)`` that nothing else reads."""
    if len(node.args) != 2 or node.kwargs not in ({}, {"non_blocking": False}):
        return None
    view, value = node.args
    found = _view_index(view) if isinstance(view, Node) and len(view.users) == 1 else None
    write = None if found is None else _indexed(*found, value, node, aliases)
    return None if write is None else replace(write, nodes=(view, *write.nodes))


def _index_put(node: Node, aliases: Aliases) -> Write | None:
    """``buf.index_put_((i,), y)`` without accumulating: ``buf[i] = y``."""
    accumulate = call_arg(node, 3, "accumulate", False)
    if len(node.args) not in (3, 4) or set(node.kwargs) - {"accumulate"} or accumulate is not False:
        return None
    buffer, indices, value = node.args[:3]
    if not isinstance(indices, (tuple, list)) or len(indices) != 1 or not isinstance(indices[0], Node) \
            or not _same_dtype(buffer, value):
        return None
    return _indexed(buffer, indices[0], value, node, aliases)


def _index_copy(node: Node, aliases: Aliases) -> Write | None:
    """``buf.index_copy_(d, i, y)``: the slot ``i`` of dim ``d``, kept at size 1 (even for a 0-d ``i``)."""
    if node.kwargs or len(node.args) != 4:
        return None
    buffer, dim, index, value = node.args
    ndim = _ndim(buffer)
    if ndim is None or not isinstance(index, Node) or not _is_int(dim) or not -ndim <= dim < ndim:
        return None
    found = _constant_index(index, aliases)
    if found is None or found[0] < 0 or not _same_dtype(buffer, value):
        return None
    position, _, nodes = found
    return Write(buffer, dim % ndim, position, True, value, (*nodes, node))


_COPY = {"copy_", torch.ops.aten.copy_, torch.ops.aten.copy_.default}
_RECOGNISERS = {
    operator.setitem: _setitem,
    **dict.fromkeys(_COPY, _copy),
    "index_put_": _index_put,
    torch.index_put_: _index_put,
    "index_copy_": _index_copy,
}


def _indexed(buffer, index, value, node: Node, aliases: Aliases) -> Write | None:
    """The write of ``value`` into ``buffer[index]`` made by ``node``, where ``index`` selects one slot."""
    ndim = _ndim(buffer)
    slot = None if ndim is None or not isinstance(value, Node) else _slot(index, ndim, aliases)
    if slot is None:
        return None
    dim, position, keepdim, nodes = slot
    return Write(buffer, dim, position, keepdim, value, (*nodes, node))


def _view_index(view: Node) -> tuple[Node, object] | None:
    """``(buf, index)`` of a view ``buf[index]`` made by basic indexing, ``select`` or ``narrow`` by one, else
    ``None`` (an index tensor or list copies: ``copy_`` would write into the copy)."""
    buffer = view.args[0] if view.op in ("call_function", "call_method") and view.args else None
    ndim = _ndim(buffer)
    if ndim is None:
        return None
    if view.target is operator.getitem and len(view.args) == 2:
        index = view.args[1]
        items = index if isinstance(index, tuple) else (index,)
        return None if any(isinstance(item, (Node, list)) for item in items) else (buffer, index)
    dim = call_arg(view, 1, "dim")
    if not _is_int(dim) or not -ndim <= dim < ndim:
        return None
    dim %= ndim
    if view.target in ("select", torch.select):
        item = call_arg(view, 2, "index")
    elif view.target in ("narrow", torch.narrow) and call_arg(view, 3, "length") == 1:
        start, size = call_arg(view, 2, "start"), static_size(example(buffer).shape[dim])
        if not _is_int(start) or size is None or not -size <= start < size:
            return None
        item = slice(start % size, start % size + 1)  # narrow counts a negative start from the end
    else:
        return None
    return (buffer, (_FULL,) * dim + (item,)) if _is_int(item) or isinstance(item, slice) else None


def _slot(index, ndim: int, aliases: Aliases) -> tuple[int, int, bool, tuple[Node, ...]] | None:
    """``(dim, position, keepdim, nodes)`` of an index of one position item among full slices and at most one
    ``...`` (see the module docstring), else ``None``; ``nodes``: the constant index tensor's."""
    items = index if isinstance(index, tuple) else (index,)
    picked = [k for k, item in enumerate(items) if item is not Ellipsis and not _is_full(item)]
    ellipses = [k for k, item in enumerate(items) if item is Ellipsis]
    if len(picked) != 1 or len(ellipses) > 1:
        return None
    (k,) = picked
    dim = ndim - (len(items) - k) if ellipses and ellipses[0] < k else k
    found = _position(items[k], aliases)
    return None if found is None or not 0 <= dim < ndim else (dim, *found)


def _position(item, aliases: Aliases) -> tuple[int, bool, tuple[Node, ...]] | None:
    """``(position, keepdim, nodes)`` of one position item: an int, a slice ``a:a+1``, a list ``[a]``, a constant
    index tensor."""
    if _is_int(item):
        return item, False, ()
    if isinstance(item, slice) and _is_int(item.start) and item.start >= 0 and item.step in (None, 1) \
            and _is_int(item.stop) and item.stop == item.start + 1:
        return item.start, True, ()
    if isinstance(item, list) and len(item) == 1 and _is_int(item[0]):
        return item[0], True, ()
    return _constant_index(item, aliases) if isinstance(item, Node) else None


def _constant_index(node: Node, aliases: Aliases) -> tuple[int, bool, tuple[Node, ...]] | None:
    """``(position, keepdim, nodes)`` of a constant index tensor of one element (``keepdim``: it is 1-d), made by
    ``nodes`` from Python ints (:func:`_constant_ints`), which nothing writes to; else ``None``."""
    found = _constant_ints(node)
    value = example(node)
    if found is None or not isinstance(value, torch.Tensor) or value.dtype not in _INDEX_DTYPES \
            or value.ndim > 1 or len(found[0]) != 1:
        return None
    ints, nodes = found
    for made in nodes:
        every = aliases.of(made)
        if every is None or _may_be_written(every):
            return None
    return ints[0], value.ndim == 1, nodes


def _may_be_written(tensor_aliases: list[Node]) -> bool:
    """Whether a node may write to a tensor (one of ``tensor_aliases``): an in-place op on one of them (its first
    argument, the one such ops write), or one that writes elsewhere than a plain first argument (``out=``)."""
    for alias in tensor_aliases:
        for user in alias.users:
            first = user.args[0] if user.args else None
            if mutates(user) and (user.kwargs.get("out") is not None or not isinstance(first, Node)
                                  or first in tensor_aliases):
                return True
    return False


def _constant_ints(node: Node):
    """``(ints, nodes)``: the elements of a 0-d or 1-d tensor that ``nodes`` make from Python ints alone,
    ``torch.tensor(a)``, ``torch.tensor([a, ..])``, ``torch.full(size, a)``, ``torch.arange(..)`` and ints and
    slices of those (as Python indexes its lists: the same elements); else ``None``."""
    value = example(node)
    if node.op != "call_function" or not isinstance(value, torch.Tensor) or value.ndim > 1:
        return None
    args = node.args
    if node.target in (torch.tensor, torch.full, torch.arange) and set(node.kwargs) - _FACTORY_KWARGS:
        return None
    if node.target is torch.tensor and len(args) == 1:
        data = args[0]
        ints = [data] if _is_int(data) else list(data) if isinstance(data, (list, tuple)) else None
        return (ints, (node,)) if ints is not None and all(map(_is_int, ints)) else None
    if node.target is torch.full and len(args) == 2 and isinstance(args[0], (tuple, list)):
        size, fill = args
        return ([fill] * math.prod(size), (node,)) if _is_int(fill) and all(map(_is_int, size)) else None
    if node.target is torch.arange and 1 <= len(args) <= 3 and all(map(_is_int, args)):
        return range(*args), (node,)
    if node.target is operator.getitem and len(args) == 2 and isinstance(args[0], Node):
        base, item = _constant_ints(args[0]), args[1]
        if base is None or example(args[0]).ndim != 1:
            return None
        if _is_int(item) and -len(base[0]) <= item < len(base[0]):
            return [base[0][item]], (*base[1], node)
        if isinstance(item, slice) and all(v is None or _is_int(v) for v in (item.start, item.stop, item.step)) \
                and (item.step is None or item.step > 0):
            return base[0][item], (*base[1], node)
    return None


def _plan(group: list[Write], position: dict, aliases: Aliases):
    """``(dim, index, values, combine)`` for the one write ``buf[index] = combine(values, dim)`` that replaces
    ``group``, or ``None`` where it does not qualify (see the module docstring)."""
    buffer, dim, keepdim = group[0].buffer, group[0].dim, group[0].keepdim
    target = example(buffer)
    if any((write.dim, write.keepdim) != (dim, keepdim) for write in group):
        return None
    size = static_size(target.shape[dim])
    if size is None or any(not -size <= write.position < size for write in group):
        return None  # a symbolic size: no positions to compare
    indexes = [write.position % size for write in group]
    stride = indexes[1] - indexes[0]
    if stride == 0 or any(b - a != stride for a, b in zip(indexes, indexes[1:])):
        return None
    values = [write.value for write in group]
    slot_shape = tuple(target.shape[:dim]) + ((1,) if keepdim else ()) + tuple(target.shape[dim + 1 :])
    examples = [example(value) for value in values]
    if any(not isinstance(value, torch.Tensor) or tuple(value.shape) != slot_shape for value in examples):
        return None
    if len({value.dtype for value in examples}) != 1:
        return None
    buffer_aliases = aliases.of(buffer)
    if buffer_aliases is None or any(value in buffer_aliases for value in values):
        return None  # a value read from the buffer would be read before the writes it followed
    own = {node for write in group for node in write.nodes}
    first, last = position[group[0].nodes[-1]], position[group[-1].nodes[-1]]
    if not _unobserved(buffer_aliases, own, first, last, position):
        return None
    for write in group:
        if not _unchanged(write.value, position[write.nodes[-1]], last, position, aliases):
            return None
    if stride < 0:  # written backwards: the same slots, stacked in reverse, written forwards
        values, indexes = values[::-1], indexes[::-1]
    index = slice(indexes[0], indexes[-1] + 1, abs(stride))
    return dim, tuple([_FULL] * dim + [index]), values, torch.cat if keepdim else torch.stack


def _unobserved(buffer_aliases: list[Node], own: set, first: int, last: int, position: dict) -> bool:
    """Whether no node but the writes' ``own`` reads the buffer (one of ``buffer_aliases``) strictly between
    ``first`` and ``last``."""
    for alias in buffer_aliases:
        if alias not in own and first < position.get(alias, -1) < last:
            return False  # a view of the buffer made while it is written
        for user in alias.users:
            if user in own:
                continue
            if first < position[user] < last:
                return False
            if position[user] < last and example(user) is None and user.target is not operator.setitem:
                return False  # it may return an alias that is read later: unknown without an example value
    return True


def _unchanged(value: Node, written: int, last: int, position: dict, aliases: Aliases) -> bool:
    """Whether nothing writes to ``value`` or an alias of it after ``written`` up to ``last``."""
    found = aliases.of(value)
    if found is None:
        return False
    return not any(
        mutates(user) and written < position[user] <= last for alias in found for user in alias.users
    )


def _sink(graph: fx.Graph, group: list[Write], position: dict, dim: int, index: tuple, values: list[Node],
          combine) -> None:
    """Replace ``group`` by ``setitem(buffer, index, combine(values, dim))`` after its last write; the writes'
    nodes that nothing else reads go."""
    buffer, last = group[0].buffer, group[-1].nodes[-1]
    examples = [example(value) for value in values]
    fake_mode = getattr(examples[0], "fake_mode", None)
    with fake_mode if fake_mode is not None else torch.no_grad():
        combined_value = combine(examples, dim)
    with graph.inserting_after(last):
        combined = graph.call_function(combine, (list(values), dim))
    with graph.inserting_after(combined):
        write = graph.call_function(operator.setitem, (buffer, index, combined))
    combined.meta["example_value"] = combined.meta["val"] = combined_value
    write.meta = {key: value for key, value in last.meta.items() if key not in ("example_value", "val")}
    made = {node for old in group for node in old.nodes}
    for node in sorted(made, key=position.__getitem__, reverse=True):
        if not node.users:  # a write, then its view, then its index (a shared arange once its slices are gone)
            graph.erase_node(node)


def _ndim(buffer) -> int | None:
    """The number of dims of ``buffer``'s tensor, ``None`` where it is no node with a tensor example value."""
    value = example(buffer) if isinstance(buffer, Node) else None
    return value.ndim if isinstance(value, torch.Tensor) else None


def _same_dtype(buffer, value) -> bool:
    """Whether ``buffer`` and ``value`` are nodes of tensors of one dtype."""
    tensors = [example(node) if isinstance(node, Node) else None for node in (buffer, value)]
    return all(isinstance(tensor, torch.Tensor) for tensor in tensors) and tensors[0].dtype == tensors[1].dtype


def _is_full(item) -> bool:
    return isinstance(item, slice) and item == _FULL


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
