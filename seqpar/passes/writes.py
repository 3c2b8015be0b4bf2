"""Per-step writes into one buffer, moved after the loop: ``buf[:, t] = y_t`` becomes one write of all ``y``.

A recurrence that fills a preallocated buffer step by step (RWKV's
``output[:, t] = ...``, RecurrentGemma's ``contextualized_states[:, t] =
...``) mutates a tensor inside every segment, which no chain may do. When
nothing reads the buffer between its first and its last write, the ``n``
writes ``setitem(buf, index_i, y_i)`` at evenly spaced positions
``a + k i`` of one dim ``d`` equal one write after the last,

    buf[.., a : a + k n : k, ..] = stack([y_0, .., y_{n-1}], d)

(for ``k < 0`` the values are stacked in reverse and written with step
``-k``): every ``y_i`` is read after the segments, a per-step output
(:mod:`.segments`), and the chain op serves the stack as one view
(:mod:`.rewrite`). :func:`sink_buffer_writes` does this for every buffer
whose writes qualify:

  * every write is ``operator.setitem(buf, index, y)`` with ``index`` an int
    or a tuple of full slices ``:`` and one int, the same pattern in every
    write, the ints (taken modulo the dim's size) evenly spaced, distinct;
  * every ``y`` is a tensor of the written slice's shape (no broadcasting),
    of one dtype and no alias of ``buf``, and nothing writes to ``y`` (or an
    alias of it) between its write and the last;
  * no node but the writes reads ``buf`` or an alias of it between the first
    write and the last (the buffer's value there is never observed), and
    every such node has an example value (aliasing is read from them).

The graph then computes the same values: the buffer holds the same numbers
after the last write, and nothing could see it in between.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.node import Node

from .effects import mutates
from .inplace import Aliases
from .tokens import example

_FULL = slice(None, None, None)


def sink_buffer_writes(gm: fx.GraphModule) -> int:
    """Move every qualifying group of per-step buffer writes after its last write (in place); how many moved."""
    graph = gm.graph
    writes: dict[Node, list[Node]] = {}
    for node in graph.nodes:
        if _is_write(node) and isinstance(node.args[0], Node):
            writes.setdefault(node.args[0], []).append(node)
    groups = [group for group in writes.values() if len(group) >= 2]
    if not groups:
        return 0
    aliases = Aliases(graph)  # a moved group adds a stack (a new tensor) and a write (no value): still valid
    moved = 0
    for group in groups:
        position = {node: index for index, node in enumerate(graph.nodes)}  # with the nodes earlier moves added
        plan = _plan(group, position, aliases)
        if plan is not None:
            _sink(graph, group, *plan)
            moved += 1
    if moved:
        graph.lint()
        gm.recompile()
    return moved


def _plan(group: list[Node], position: dict, aliases: Aliases):
    """``(dim, index, values)`` for the one write that replaces ``group``, or ``None`` where it does not
    qualify (see the module docstring)."""
    buffer = group[0].args[0]
    target = example(buffer)
    if not isinstance(target, torch.Tensor) or any(node.kwargs or len(node.args) != 3 for node in group):
        return None
    patterns = [_pattern(node.args[1]) for node in group]
    if any(pattern is None for pattern in patterns) or len({dim for dim, _ in patterns}) != 1:
        return None
    dim = patterns[0][0]
    if dim >= target.ndim:
        return None
    size = target.shape[dim]
    if not isinstance(size, int) or size == 0:  # a symbolic size: no positions to compare
        return None
    indexes = [index % size for _, index in patterns]
    stride = indexes[1] - indexes[0]
    if stride == 0 or any(b - a != stride for a, b in zip(indexes, indexes[1:])):
        return None
    values = [node.args[2] for node in group]
    slice_shape = tuple(target.shape[:dim]) + tuple(target.shape[dim + 1 :])
    examples = [example(value) if isinstance(value, Node) else None for value in values]
    if any(not isinstance(value, torch.Tensor) or tuple(value.shape) != slice_shape for value in examples):
        return None
    if len({value.dtype for value in examples}) != 1:
        return None
    found = aliases.of(buffer)
    if found is None or any(value in found for value in values):
        return None  # a value read from the buffer would be read before the writes it followed
    first, last = position[group[0]], position[group[-1]]
    if not _unobserved(buffer, set(group), first, last, position, aliases):
        return None
    for write, value in zip(group, values):
        if not _unchanged(value, position[write], last, position, aliases):
            return None
    if stride < 0:  # written backwards: the same slots, stacked in reverse, written forwards
        values, indexes = values[::-1], indexes[::-1]
    step = abs(stride)
    index = slice(indexes[0], indexes[-1] + 1, step)
    full_index = tuple([_FULL] * dim + [index])
    return dim, full_index, values


def _pattern(index):
    """``(dim, i)`` of an index ``i`` or ``(:, .., :, i)`` (``dim`` full slices first), else ``None``."""
    items = index if isinstance(index, tuple) else (index,)
    if not items or not all(item == _FULL for item in items[:-1]):
        return None
    last = items[-1]
    if not isinstance(last, int) or isinstance(last, bool):
        return None
    return len(items) - 1, last


def _unobserved(buffer: Node, writes: set, first: int, last: int, position: dict, aliases: Aliases) -> bool:
    """Whether no node but ``writes`` reads ``buffer`` or an alias of it strictly between ``first`` and ``last``."""
    found = aliases.of(buffer)
    if found is None:
        return False
    for alias in found:
        if first < position.get(alias, -1) < last:
            return False  # a view of the buffer made while it is written
        for user in alias.users:
            if user in writes:
                continue
            if first < position[user] < last:
                return False
            if position[user] < last and example(user) is None and not _is_write(user):
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


def _is_write(node: Node) -> bool:
    return node.op == "call_function" and node.target is operator.setitem


def _sink(graph: fx.Graph, group: list[Node], dim: int, index: tuple, values: list[Node]) -> None:
    """Replace ``group`` by ``setitem(buffer, index, stack(values, dim))`` after its last write."""
    buffer, last = group[0].args[0], group[-1]
    examples = [example(value) for value in values]
    fake_mode = getattr(examples[0], "fake_mode", None)
    with fake_mode if fake_mode is not None else torch.no_grad():
        stacked_value = torch.stack(examples, dim)
    with graph.inserting_after(last):
        stacked = graph.call_function(torch.stack, (list(values), dim))
    with graph.inserting_after(stacked):
        write = graph.call_function(operator.setitem, (buffer, index, stacked))
    stacked.meta["example_value"] = stacked.meta["val"] = stacked_value
    write.meta = {key: value for key, value in last.meta.items() if key not in ("example_value", "val")}
    for node in group:
        graph.erase_node(node)
