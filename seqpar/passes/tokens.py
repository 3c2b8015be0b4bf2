"""Node tokens and argument structure: what makes two FX nodes the same operation.

``node_token(n)`` is a hashable ``(op, target, argument structure, kwargs
structure, output shape and dtype)`` in which argument nodes and Python
numbers are abstracted away. Guarantees:
  * equal tokens mean the same op and target, the same nesting of arguments
    (nodes and numbers at the same places) and the same output shape and dtype;
  * :func:`flatten_args` and :func:`rebuild_args` visit the leaves of an
    argument structure in one fixed order, so leaf ``j`` of two nodes with
    equal tokens is the same argument position ("slot" ``(offset, j)`` in
    detection).
Pure functions of a node and its meta (and, for a ``get_attr`` of a body graph, that graph); nothing here
looks at other nodes of the graph.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.fx.node import Node

_NODE = "<node>"

# Ops and tensor attributes that only reinterpret a tensor's storage (no copy, no arithmetic), by name.
VIEW_OPS = frozenset({"t", "transpose", "swapaxes", "swapdims", "permute", "movedim", "view", "reshape",
                      "unsqueeze", "squeeze", "flatten", "unflatten", "expand"})
VIEW_ATTRIBUTES = frozenset({"T", "mT", "H", "mH"})
# Calls that return their input's value unchanged (a copy or an alias of it).
VALUE_COPIES = frozenset({"clone", "contiguous", "detach", "alias"})


def is_number(value) -> bool:
    """A Python int or float (not a bool): a literal that may become a per-step input."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def hashable(value) -> bool:
    try:
        hash(value)
        return True
    except TypeError:
        return False


def arg_signature(arg):
    """Hashable structure of an argument: nodes and numbers abstracted."""
    if isinstance(arg, Node):
        return _NODE
    if isinstance(arg, (tuple, list)):
        return ("seq", tuple(arg_signature(a) for a in arg))
    if isinstance(arg, dict):
        return ("dict", tuple((k, arg_signature(v)) for k, v in arg.items()))
    if isinstance(arg, slice):
        return ("slice", arg_signature(arg.start), arg_signature(arg.stop), arg_signature(arg.step))
    if is_number(arg):
        return type(arg).__name__
    return arg if hashable(arg) else repr(arg)


def flatten_args(arg, out: list) -> list:
    """Leaves of an argument structure, in a fixed order (matches :func:`rebuild_args`)."""
    if isinstance(arg, (tuple, list)):
        for a in arg:
            flatten_args(a, out)
    elif isinstance(arg, dict):
        for a in arg.values():
            flatten_args(a, out)
    elif isinstance(arg, slice):
        flatten_args(arg.start, out)
        flatten_args(arg.stop, out)
        flatten_args(arg.step, out)
    else:
        out.append(arg)
    return out


def rebuild_args(arg, leaf: Callable[[int, Any], Any], counter: list[int]):
    """``arg`` with leaf ``j`` (in :func:`flatten_args` order) replaced by ``leaf(j, value)``."""
    if isinstance(arg, (tuple, list)):
        items = [rebuild_args(a, leaf, counter) for a in arg]
        return tuple(items) if isinstance(arg, tuple) else items
    if isinstance(arg, dict):
        return {k: rebuild_args(v, leaf, counter) for k, v in arg.items()}
    if isinstance(arg, slice):
        return slice(rebuild_args(arg.start, leaf, counter), rebuild_args(arg.stop, leaf, counter),
                     rebuild_args(arg.step, leaf, counter))
    index = counter[0]
    counter[0] += 1
    return leaf(index, arg)


def value_signature(value):
    """Shape and dtype of an ``example_value`` (hashable)."""
    if isinstance(value, torch.Tensor):
        return (tuple(d if isinstance(d, int) else str(d) for d in value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(value_signature(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value if not is_number(value) else type(value).__name__
    return type(value).__name__


def example(node: Node):
    """The node's example value (Dynamo's ``example_value``, or ``val``), or ``None``."""
    return node.meta.get("example_value", node.meta.get("val"))


def node_token(n: Node):
    """The hashable token of ``n``: equal for nodes that do the same operation (see the module docstring).

    A ``get_attr`` of a graph (the body of a :func:`subgraph_call`) is named by the body's structure
    (:func:`graph_signature`), not by its attribute: Dynamo gives every checkpointed block a body of its own
    (``wrap_body_0``, ``wrap_body_1``, ..), the same graph with each block's parameters as operands."""
    if n.op == "get_attr":
        body = attribute_of(n)
        if isinstance(body, torch.fx.GraphModule):
            return ("get_attr", graph_signature(body))
    target = n.target if n.op != "call_function" or hashable(n.target) else repr(n.target)
    return (n.op, target, arg_signature(n.args), arg_signature(n.kwargs), value_signature(example(n)))


_signatures: "weakref.WeakKeyDictionary[torch.fx.GraphModule, tuple]" = weakref.WeakKeyDictionary()


def graph_signature(body: torch.fx.GraphModule) -> tuple:
    """The structure of ``body``'s graph: per node its token (a placeholder by its value, not its name; an
    attribute that is no graph, a constant of the body's own, by its identity), which earlier nodes its
    arguments are, and its literal arguments by value (a token abstracts numbers, which detection compares per
    segment; a body's are out of its sight: ``x + 0.5 * f(x)`` and ``x + 0.7 * f(x)`` are different bodies).
    Equal signatures: the same computation of the same operands."""
    signature = _signatures.get(body)
    if signature is None:
        index: dict[Node, int] = {}
        rows = []
        for position, node in enumerate(body.graph.nodes):
            index[node] = position
            leaves = flatten_args((node.args, node.kwargs), [])
            wiring = tuple(index[a] for a in leaves if a.__class__ is Node)
            literals = tuple(a if hashable(a) else repr(a) for a in leaves if a.__class__ is not Node)
            value = attribute_of(node) if node.op == "get_attr" else None
            if node.op == "placeholder":
                token = ("placeholder", value_signature(example(node)))
            elif node.op == "get_attr" and not isinstance(value, torch.fx.GraphModule):
                token = ("get_attr", id(value))
            else:
                token = node_token(node)
            rows.append((token, wiring, literals))
        signature = _signatures[body] = ("graph", tuple(rows))
    return signature


def attribute_of(n: Node):
    """The module attribute a ``get_attr`` node reads, ``None`` where it cannot be found."""
    value = n.graph.owning_module
    try:
        for name in n.target.split("."):
            value = getattr(value, name)
    except AttributeError:
        return None
    return value


def static_size(size) -> int | None:
    """A size as the ``int`` it is: a ``SymInt`` Dynamo specialised to a constant included (a static graph traced
    after a recompile, where a loop over ``range(x.size(1))`` fixed the length, holds its sizes so); ``None`` for
    one that varies."""
    if isinstance(size, torch.SymInt):
        return size.node.maybe_as_int() if is_concrete_int(size) else None
    return size if isinstance(size, int) else None


def target_name(node: Node) -> str:
    """The short name of what ``node`` calls: ``"linear"``, ``"add"``, ``"__add__"``, ``"invoke_subgraph"``."""
    if node.op == "call_method":
        return node.target
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


# Higher-order calls of a body graph (their first argument) on the operands from this argument on: Dynamo's
# nested compile regions, and activation checkpointing (``torch.utils.checkpoint``), whose body is the
# checkpointed function. Inlined in a chain's step; a chain left in the graph keeps its calls, checkpointing
# included (seqpar's own adjoint keeps only the states).
SUBGRAPH_CALLS = {"invoke_subgraph": 2, "tag_activation_checkpoint": 1}


def subgraph_call(node: Node) -> int | None:
    """Where the operands of ``node`` begin if it is a call of a body graph (:data:`SUBGRAPH_CALLS`), else ``None``."""
    if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
        return SUBGRAPH_CALLS.get(target_name(node))
    return None


def subgraph_body(node: Node) -> torch.fx.GraphModule | None:
    """The body graph a :func:`subgraph_call` calls (its ``get_attr`` argument 0), ``None`` where ``node`` is no
    such call or its body cannot be found."""
    if subgraph_call(node) is None:
        return None
    body = node.args[0]
    module = attribute_of(body) if body.__class__ is Node and body.op == "get_attr" else None
    return module if isinstance(module, torch.fx.GraphModule) else None


def call_arg(node: Node, index: int, name: str, default=None):
    """Argument ``index`` of ``node``'s call, given positionally or as keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)
