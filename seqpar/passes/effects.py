"""Which nodes may be part of a chain's step, and which literals may differ per step.

Guarantees: :func:`side_effect` returns a reason for every node whose
re-execution inside the solver (many times, in any order, batched) could
change results: module calls detection cannot see into, higher-order ops
other than calls of a body graph (``invoke_subgraph``, activation
checkpointing: :data:`~.tokens.SUBGRAPH_CALLS`) and those whose body has a
side effect, global state, in-place mutation (unless the caller
functionalises it: ``in_place=False``), BatchNorm in training mode and, on the
state path, random draws. :func:`mutates` tells the in-place ops
(``relu_``, ``x += y``, ``inplace=True`` given by name or position, ``out=``)
and :func:`out_of_place` gives the call that computes the same value without
writing to its first argument, where there is one. :func:`may_vary` names the
only literals a step may take per step (top-level arithmetic operands).
"""

from __future__ import annotations

import functools
import inspect
import operator
from typing import Any

import torch
from torch.fx.node import Node

from .tokens import call_arg, subgraph_body, subgraph_call, target_name

BATCHNORM_TRAINING = "BatchNorm in training mode updates running statistics; chain left sequential"

_RANDOM = {
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "normal",
    "bernoulli", "multinomial", "poisson", "native_dropout", "rrelu",
}
_DROPOUTS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
             "feature_dropout"}
_GLOBAL_STATE = {
    "_set_grad_enabled", "set_grad_enabled", "_enter_autocast", "_exit_autocast", "manual_seed", "seed",
    "set_rng_state", "_record_function_enter", "_record_function_enter_new", "_record_function_exit",
    "set_default_dtype", "_set_deterministic_algorithms", "print",
}
_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift, operator.setitem, operator.delitem,
}
# Python's operators named after keywords: their trailing underscore marks no in-place op.
_KEYWORD_OPERATORS = {operator.not_, operator.and_, operator.or_, operator.is_, operator.is_not}
_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
                    "__imatmul__", "__iand__", "__ior__", "__ixor__", "__setitem__", "__delitem__"}
# The out-of-place twin of an in-place operator (``a += b`` -> ``a + b``); ``setitem``/``delitem`` have none.
_OUT_OF_PLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv, operator.imod: operator.mod,
    operator.ipow: operator.pow, operator.imatmul: operator.matmul, operator.iand: operator.and_,
    operator.ior: operator.or_, operator.ixor: operator.xor, operator.ilshift: operator.lshift,
    operator.irshift: operator.rshift,
}
# ``name_`` ops whose ``name`` is another computation (``x.bernoulli_(p)`` draws with probability ``p``,
# ``x.bernoulli()`` with probabilities ``x``) or no computation at all.
_NO_TWIN = {"resize", "resize_as", "set", "share_memory", "requires_grad", "retain_grad", "copy"}

# Ops whose Python-number operands may become 0-d tensors (per-step "constant" inputs).
_ARITHMETIC = {
    "add", "sub", "mul", "truediv", "div", "true_divide", "rsub", "pow", "lerp", "maximum", "minimum",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "__pow__", "__rpow__",
}


def side_effect(node: Node, on_state: bool, in_place: bool = True) -> str | None:
    """Why ``node`` may not be inside a chain, or ``None``; ``on_state``: it depends on the state.

    ``in_place=False``: in-place mutation is no reason (the caller checks it with :func:`mutates`).
    """
    if node.op == "call_module":
        return f"{node.name} calls module {node.target}, which detection cannot see into"
    if node.op not in ("call_function", "call_method"):
        return None
    name = target_name(node)
    if name == "batch_norm" and call_arg(node, 5, "training", False) is True:
        return BATCHNORM_TRAINING
    if isinstance(node.target, torch._ops.HigherOrderOperator):
        if subgraph_call(node) is None:
            return f"{node.name} is a torch.ops.higher_order.{name} call"
        inside = _body_side_effect(node)
        if inside is not None:
            return f"{node.name} ({name}) calls a body in which {inside}"
    if name in _GLOBAL_STATE or name.startswith("_set_"):
        return f"{node.name} ({name}) changes global state"
    if in_place and mutates(node):
        return f"{node.name} ({name}) mutates a tensor in place"
    if on_state and is_random(node):
        return f"{node.name} ({name}) draws random numbers on the state path"
    return None


def _body_side_effect(call: Node) -> str | None:
    """The first side effect (:func:`side_effect`, random draws counted) in the body ``call`` calls, or ``None``."""
    body = subgraph_body(call)
    if body is None:
        return f"{call.name}'s body is not a graph"
    for node in body.graph.nodes:
        reason = side_effect(node, True)
        if reason is not None:
            return reason
    return None


def mutates(node: Node) -> bool:
    """Whether ``node`` writes to a tensor it reads: ``relu_``, ``a += b``, ``inplace=True``, ``out=``."""
    if node.op not in ("call_function", "call_method"):
        return False
    name = target_name(node)
    return (node.target in _INPLACE_OPERATORS or name in _INPLACE_DUNDERS or node.kwargs.get("out") is not None
            or (name.endswith("_") and not name.startswith("_") and node.target not in _KEYWORD_OPERATORS)
            or _inplace_flag(node.target, node.args, node.kwargs)[1] is True)


def out_of_place(op: str, target: Any, args: tuple, kwargs: dict) -> tuple[str, Any, tuple, dict] | None:
    """``(op, target, args, kwargs)`` of the call that computes what the in-place call computes, or ``None``.

    The twin returns the value the in-place call leaves in its first argument
    (``relu_(a)`` -> ``relu(a)``, ``a += b`` -> ``a + b``, ``f(a, inplace=True)``
    -> ``f(a, inplace=False)``) but may promote dtypes or broadcast where the
    in-place call keeps its argument's; callers compare the results.
    """
    if kwargs.get("out") is not None:
        return None
    if target in _OUT_OF_PLACE_OPERATORS:
        return op, _OUT_OF_PLACE_OPERATORS[target], args, kwargs
    index, flag = _inplace_flag(target, args, kwargs)
    if flag is True:
        if index is None:
            return op, target, args, {**kwargs, "inplace": False}
        return op, target, args[:index] + (False,) + args[index + 1:], kwargs
    overload = isinstance(target, torch._ops.OpOverload)
    name = target if op == "call_method" else target._schema.name.split("::")[-1] if overload \
        else getattr(target, "__name__", "")
    if not isinstance(name, str):
        return None
    if name in _INPLACE_DUNDERS:  # __iadd__ -> __add__; __setitem__ and __delitem__ have no twin
        twin = "__" + name[3:]
        return (op, twin, args, kwargs) if op == "call_method" and name not in ("__setitem__", "__delitem__") \
            else None
    base = name[:-1]
    if not name.endswith("_") or name.startswith("_") or base in _NO_TWIN or base in _RANDOM:
        return None
    if op == "call_method":
        return (op, base, args, kwargs) if callable(getattr(torch.Tensor, base, None)) else None
    if overload:  # aten.add_.Tensor -> aten.add.Tensor
        twin = getattr(getattr(torch.ops.aten, base, None), target._overloadname, None)
        return (op, twin, args, kwargs) if twin is not None else None
    for namespace in (torch, torch.nn.functional, torch._C._nn, torch.Tensor):
        if getattr(namespace, name, None) is target and callable(getattr(namespace, base, None)):
            return op, getattr(namespace, base), args, kwargs
    return None


def _inplace_flag(target: Any, args: tuple, kwargs: dict) -> tuple[int | None, Any]:
    """``(position, value)`` of an ``inplace`` argument (position ``None``: by name or absent)."""
    if "inplace" in kwargs:
        return None, kwargs["inplace"]
    index = _inplace_position(target) if args and inspect.isfunction(target) else None
    return (index, args[index]) if index is not None and index < len(args) else (None, None)


@functools.lru_cache(maxsize=None)
def _inplace_position(function) -> int | None:
    """The position of a Python function's ``inplace`` parameter (``F.leaky_relu(x, 0.1, True)``), or ``None``."""
    try:
        names = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def is_random(node: Node) -> bool:
    """Whether ``node`` draws random numbers (dropout only in training mode, and with a probability that is not
    a literal 0: ``dropout(x, 0.0, True)`` returns ``x`` without drawing, as a config's ``dropout=0.0`` in
    train mode does)."""
    name = target_name(node) if node.op in ("call_function", "call_method") else ""
    if name in _DROPOUTS:
        return call_arg(node, 2, "training", True) is True and call_arg(node, 1, "p", 0.5) != 0
    return name in _RANDOM


def may_vary(node: Node, leaf: int) -> bool:
    """Whether leaf ``leaf`` of ``node`` may differ between steps (a top-level arithmetic operand)."""
    if node.op not in ("call_function", "call_method") or target_name(node) not in _ARITHMETIC:
        return False
    args = node.args
    return leaf < len(args) and all(not isinstance(a, (tuple, list, dict, slice)) for a in args[: leaf + 1])
