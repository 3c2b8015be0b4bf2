"""Per-step inputs that are consecutive slices of one tensor: ``x_l = view(P[a + l])``.

A model that keeps its layers stacked (``W: (L, m, n)``, read as ``W[l]`` in
step ``l``) reaches the Dynamo graph as one ``select``/``getitem`` node per
step, often followed by views (``W[l].T``). :func:`as_slice` recognises such a
per-step input so that the chain reads ``P[a : a + L]`` (``P`` itself when
that is all of it) instead of a stack of ``L`` selects.

Guarantees of a returned :class:`Slice`, for the per-step nodes ``nodes``
(``nodes[l]`` read by step ``l``):
  * ``nodes[l]`` is ``views(P[a + l])``: ``P`` is one tensor-valued node,
    indexed on dim 0 (``getitem`` with an int, ``select(P, 0, i)``) at
    ``a, a + 1, .., a + L - 1`` (negative indexes normalised);
  * ``views`` are the same view ops with the same literal arguments in every
    step (``.T``, ``transpose``, ``reshape``, ..): free to redo in the step, so
    the step takes the slice and applies them itself;
  * ``chain`` is step 0's ``[P[a], view_1, .., nodes[0]]``: graph nodes, for
    the step's placeholder meta and the views it copies.
Nothing here depends on the state: the caller hands in per-step inputs that do
not, and the nodes they are computed from do not either.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx.node import Node

from .tokens import call_arg, example, flatten_args, node_token, target_name

# Ops that only reinterpret a tensor (no copy, no arithmetic): taken into the step.
_VIEWS = {"t", "transpose", "swapaxes", "swapdims", "permute", "movedim", "view", "reshape", "unsqueeze",
          "squeeze", "flatten", "unflatten", "expand", "detach", "alias"}
_VIEW_ATTRIBUTES = {"T", "mT", "H", "mH"}


@dataclass
class Slice:
    """``x_l = views(source[start + l])``; ``chain``: step 0's ``[source[start], *views]`` graph nodes."""

    source: Node
    start: int
    chain: list[Node]


def select_index(node: Node) -> tuple[Node, int] | None:
    """``(P, i)`` where ``node`` is ``P[i]`` of a tensor ``P`` on dim 0 (``i >= 0``), else ``None``."""
    if node.op == "call_function" and node.target is operator.getitem:
        source, dim, index = node.args[0], 0, node.args[1]
    elif node.op in ("call_function", "call_method") and target_name(node) == "select" and node.args:
        source, dim, index = node.args[0], call_arg(node, 1, "dim"), call_arg(node, 2, "index")
    else:
        return None
    value = example(source) if isinstance(source, Node) else None
    if not isinstance(value, torch.Tensor) or value.ndim == 0 or not isinstance(value.shape[0], int):
        return None
    rows = value.shape[0]
    if dim not in (0, -value.ndim) or not isinstance(index, int) or isinstance(index, bool) \
            or not -rows <= index < rows:
        return None
    return source, index % rows


def is_view(node: Node) -> bool:
    """A view op with exactly one node argument (``W_l.T``, ``W_l.view(4, 4)``), free to redo in a step."""
    if node.op == "call_function" and node.target is getattr:
        ok = len(node.args) == 2 and node.args[1] in _VIEW_ATTRIBUTES
    elif node.op in ("call_function", "call_method"):
        ok = target_name(node) in _VIEWS
    else:
        return False
    return ok and len(node.all_input_nodes) == 1


def as_slice(nodes: list[Node]) -> Slice | None:
    """``nodes`` (one per step, ``L >= 2``) as views of consecutive slices of one tensor, or ``None``."""
    column, views = list(nodes), []
    while True:
        picked = [select_index(node) for node in column]
        if all(picked):
            source, start = picked[0]
            if all(p[0] is source and p[1] == start + l for l, p in enumerate(picked)):
                return Slice(source, start, [column[0], *reversed(views)])
            return None
        first = column[0]
        if not is_view(first) or any(node_token(node) != node_token(first) for node in column):
            return None
        literals = [[a for a in flatten_args((n.args, n.kwargs), []) if a.__class__ is not Node] for n in column]
        if any(lits != literals[0] for lits in literals):
            return None
        views.append(first)
        column = [node.all_input_nodes[0] for node in column]
