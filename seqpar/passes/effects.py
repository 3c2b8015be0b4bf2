"""Which nodes may be part of a chain's step, and which literals may differ per step.

Guarantees: :func:`side_effect` returns a reason for every node whose
re-execution inside the solver (many times, in any order, batched) could
change results: module calls detection cannot see into, higher-order ops
other than ``invoke_subgraph``, global state, in-place mutation, BatchNorm in
training mode and, on the state path, random draws. :func:`may_vary` names
the only literals a step may take per step (top-level arithmetic operands).
"""

from __future__ import annotations

import operator

import torch
from torch.fx.node import Node

from .tokens import call_arg, target_name

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
_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
                    "__imatmul__", "__iand__", "__ior__", "__ixor__", "__setitem__", "__delitem__"}

# Ops whose Python-number operands may become 0-d tensors (per-step "constant" inputs).
_ARITHMETIC = {
    "add", "sub", "mul", "truediv", "div", "true_divide", "rsub", "pow", "lerp", "maximum", "minimum",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "__pow__", "__rpow__",
}


def side_effect(node: Node, on_state: bool) -> str | None:
    """Why ``node`` may not be inside a chain, or ``None``; ``on_state``: it depends on the state."""
    if node.op == "call_module":
        return f"{node.name} calls module {node.target}, which detection cannot see into"
    if node.op not in ("call_function", "call_method"):
        return None
    name = target_name(node)
    if name == "batch_norm" and call_arg(node, 5, "training", False) is True:
        return BATCHNORM_TRAINING
    if isinstance(node.target, torch._ops.HigherOrderOperator) and name != "invoke_subgraph":
        return f"{node.name} is a torch.ops.higher_order.{name} call"
    if name in _GLOBAL_STATE or name.startswith("_set_"):
        return f"{node.name} ({name}) changes global state"
    if (node.target in _INPLACE_OPERATORS or name in _INPLACE_DUNDERS or node.kwargs.get("inplace") is True
            or (name.endswith("_") and not name.startswith("_"))):
        return f"{node.name} ({name}) mutates a tensor in place"
    if on_state and is_random(node):
        return f"{node.name} ({name}) draws random numbers on the state path"
    return None


def is_random(node: Node) -> bool:
    """Whether ``node`` draws random numbers (dropout only in training mode)."""
    name = target_name(node) if node.op in ("call_function", "call_method") else ""
    return name in _RANDOM or (name in _DROPOUTS and call_arg(node, 2, "training", True) is True)


def may_vary(node: Node, leaf: int) -> bool:
    """Whether leaf ``leaf`` of ``node`` may differ between steps (a top-level arithmetic operand)."""
    if node.op not in ("call_function", "call_method") or target_name(node) not in _ARITHMETIC:
        return False
    args = node.args
    return leaf < len(args) and all(not isinstance(a, (tuple, list, dict, slice)) for a in args[: leaf + 1])
