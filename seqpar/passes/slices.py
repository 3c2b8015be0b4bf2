"""Per-step inputs that are evenly spaced slices of one tensor: ``x_l = view(P.select(d, a + k l))``.

A model that keeps its layers stacked (``W: (L, m, n)``, read as ``W[l]`` in
step ``l``) or runs a recurrence over a sequence (``x[:, t]``) reaches the
Dynamo graph as one ``select``/``getitem`` node per step, often followed by
views (``W[l].T``). :func:`as_slice` recognises such a per-step input so that
the chain reads the ``L`` slices in one or two ops
(:func:`seqpar.runtime.slicing.slice_steps`, which the rewritten graph calls:
a view of ``P`` for consecutive rows on dim 0, one copy otherwise) instead of
a stack of ``L`` selects.

Guarantees of a returned :class:`Slice`, for the per-step nodes ``nodes``
(``nodes[l]`` read by step ``l``):
  * ``nodes[l]`` is ``views(P.select(dim, start + stride * l))``: ``P`` is one
    tensor-valued node, indexed on one dim ``dim`` (``getitem`` with an int,
    after full slices ``:`` for ``dim > 0``, or ``select(P, dim, i)``) at an
    arithmetic progression of indexes with ``stride != 0`` (negative indexes
    and dims normalised);
  * ``views`` are the same view ops with the same literal arguments in every
    step (``.T``, ``transpose``, ``reshape``, ..): free to redo in the step, so
    the step takes the slice and applies them itself;
  * ``chain`` is step 0's ``[P.select(dim, start), view_1, .., nodes[0]]``:
    graph nodes, for the step's placeholder meta and the views it copies.
Nothing here depends on the state: the caller hands in per-step inputs that do
not, and the nodes they are computed from do not either.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx.node import Node

from .tokens import VIEW_ATTRIBUTES, VIEW_OPS, call_arg, example, flatten_args, node_token, target_name

# Views (and the alias-only ops) a step may take of a slice itself.
_VIEWS = VIEW_OPS | {"detach", "alias"}


@dataclass
class Slice:
    """``x_l = views(source.select(dim, start + stride * l))``; ``chain``: step 0's ``[select, *views]`` nodes."""

    source: Node
    start: int
    chain: list[Node]
    dim: int = 0
    stride: int = 1


def select_index(node: Node) -> tuple[Node, int, int] | None:
    """``(P, dim, i)`` where ``node`` is ``P.select(dim, i)`` of a tensor ``P`` (``dim, i >= 0``), else ``None``.

    Forms: ``P[i]``, ``P[:, .., :, i]``, ``P[:, .., :, i, :, .., :]`` (``getitem``;
    full slices before and after the int) and ``select(P, dim, i)`` (function or method).
    """
    if node.op == "call_function" and node.target is operator.getitem:
        found = indexed_select(node)
        if found is None or any(item != slice(None) for item in found[3]):
            return None
        return found[:3]
    if node.op in ("call_function", "call_method") and target_name(node) == "select" and node.args:
        return _normalised(node.args[0], call_arg(node, 1, "dim"), call_arg(node, 2, "index"))
    return None


def indexed_select(node: Node) -> tuple[Node, int, int, tuple] | None:
    """``(P, dim, i, rest)`` where ``node`` is ``P[:, .., :, i, *rest]`` (``getitem``: ``dim`` full slices, an
    int, then a basic index ``rest``: ints, slices, ``None``, ``...``), else ``None``. Such an index is
    ``P.select(dim, i)[:, .., :, *rest]``: the int consumes dim ``dim`` and nothing before it inserts or drops
    a dim, so every later item acts on the dim it acted on in ``P``, one place earlier."""
    if not (node.op == "call_function" and node.target is operator.getitem):
        return None
    source, index = node.args[0], node.args[1]
    items = index if isinstance(index, tuple) else (index,)
    dim = next((k for k, item in enumerate(items) if item != slice(None)), None)
    if dim is None or type(items[dim]) is not int or not basic_index(items[dim + 1:]):
        return None
    found = _normalised(source, dim, items[dim])
    return None if found is None else (*found, tuple(items[dim + 1:]))


def basic_index(index) -> bool:
    """Whether ``index`` is a basic index: ints, slices of ints, ``None`` and ``...``, alone or in a tuple."""
    items = index if isinstance(index, tuple) else (index,)
    return all(
        item is None or item is Ellipsis or type(item) is int
        or (isinstance(item, slice) and all(b is None or type(b) is int for b in (item.start, item.stop, item.step)))
        for item in items
    )


def _normalised(source, dim, index) -> tuple[Node, int, int] | None:
    """``(P, dim, i)`` with ``dim`` and ``i`` made non-negative, or ``None`` where they do not index ``P``."""
    value = example(source) if isinstance(source, Node) else None
    if not isinstance(value, torch.Tensor) or value.ndim == 0 or not isinstance(dim, int) \
            or not -value.ndim <= dim < value.ndim:
        return None
    dim %= value.ndim
    rows = value.shape[dim]
    if not isinstance(rows, int) or not isinstance(index, int) or isinstance(index, bool) \
            or not -rows <= index < rows:
        return None
    return source, dim, index % rows


def progression(picked: list) -> tuple[Node, int, int, int] | None:
    """``(P, dim, start, stride)`` where ``picked[l]`` are ``(P, dim, start + stride * l, ..)`` with ``stride != 0``
    (one tensor, one dim, evenly spaced indexes), else ``None``."""
    if not all(picked):
        return None
    source, dim, start = picked[0][:3]
    stride = picked[1][2] - start
    if stride and all(p[0] is source and p[1] == dim and p[2] == start + stride * l for l, p in enumerate(picked)):
        return source, dim, start, stride
    return None


def is_view(node: Node) -> bool:
    """A view op with exactly one node argument (``W_l.T``, ``W_l.view(4, 4)``), free to redo in a step."""
    if node.op == "call_function" and node.target is getattr:
        ok = len(node.args) == 2 and node.args[1] in VIEW_ATTRIBUTES
    elif node.op in ("call_function", "call_method"):
        ok = target_name(node) in _VIEWS
    else:
        return False
    return ok and len(node.all_input_nodes) == 1


def as_slice(nodes: list[Node]) -> Slice | None:
    """``nodes`` (one per step, ``L >= 2``) as views of evenly spaced slices of one tensor, or ``None``."""
    column, views = list(nodes), []
    while True:
        picked = [select_index(node) for node in column]
        if all(picked):
            found = progression(picked)
            if found is None:
                return None
            source, dim, start, stride = found
            return Slice(source, start, [column[0], *reversed(views)], dim, stride)
        first = column[0]
        if not is_view(first) or any(node_token(node) != node_token(first) for node in column):
            return None
        literals = [[a for a in flatten_args((n.args, n.kwargs), []) if a.__class__ is not Node] for n in column]
        if any(lits != literals[0] for lits in literals):
            return None
        views.append(first)
        column = [node.all_input_nodes[0] for node in column]
