"""Module paths of graph nodes, for naming the segments of a chain (``layers.3``).

Dynamo records the module a node was traced in as ``nn_module_stack`` with
paths such as ``L['self'].layers[3]`` or ``getattr(L['self'].layers, '3')``;
:func:`module_path` normalises them to ``["layers", "3"]`` and
:func:`varying_path` names the module that differs between two segments.
"""

from __future__ import annotations

import functools
import re

from torch.fx.node import Node

from .tokens import subgraph_body

_GETATTR = re.compile(r"getattr\(([^()]*?), '([^']*)'\)")


@functools.lru_cache(maxsize=4096)
def _normalise_path(path: str) -> str:
    while True:
        new = _GETATTR.sub(r"\1.\2", path)
        if new == path:
            break
        path = new
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    path = path.replace("._modules.", ".")
    # The compiled module or function's own name: L['self'] (a local) or G['model'] (a global).
    path = re.sub(r"^[LG]\.[A-Za-z_]\w*", "", path)
    return path.strip(".")


def module_path(node: Node) -> list[str] | None:
    """The components of the innermost module ``node`` was traced in, or ``None`` without a record. A call of a
    body graph traced outside the module it calls (``checkpoint(layer, x)`` in the parent's ``forward``) takes
    the record of its body's first node that has one."""
    stack = node.meta.get("nn_module_stack") or _body_stack(node)
    if not stack:
        return None
    entry = list(stack.values())[-1]
    path = entry[0] if isinstance(entry, tuple) else str(entry)
    path = _normalise_path(path)
    return path.split(".") if path else []


def _body_stack(node: Node) -> dict | None:
    """The ``nn_module_stack`` of the first node of ``node``'s body that has one, where ``node`` calls a body."""
    body = subgraph_body(node)
    if body is None:
        return None
    return next((inner.meta["nn_module_stack"] for inner in body.graph.nodes if inner.meta.get("nn_module_stack")),
                None)


def varying_path(a: Node, b: Node) -> str | None:
    """``a``'s module path cut after the first component where ``b``'s differs."""
    pa, pb = module_path(a), module_path(b)
    if pa is None or pb is None:
        return None
    for i, (x, y) in enumerate(zip(pa, pb)):
        if x != y:
            return ".".join(pa[: i + 1])
    return None


def span(modules: list[str]) -> str:
    """``first .. last`` of a chain's module paths; one path when every step runs the same module
    (an RNN cell, a loop in the model's own ``forward``); ``-`` when there is none."""
    named = [path for path in modules if path]
    if not named:
        return "-"
    return named[0] if named[0] == named[-1] else f"{named[0]} .. {named[-1]}"
