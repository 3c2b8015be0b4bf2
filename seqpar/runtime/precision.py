"""Precision a computation runs at: the autocast settings a step was traced under and runs under again, and
inputs of reference runs, widened to float64 (the precision the checks of a solve compare against) and copied,
so that a second run of a computation leaves the caller's tensors as they were."""

from __future__ import annotations

import contextlib

import torch
import torch.utils._pytree as pytree

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", torch._C._get_privateuse1_backend_name())


def autocast_state() -> tuple:
    """The autocast settings in force: ``(device type, dtype)`` for every device type autocast is enabled for
    (empty where it is off everywhere). Part of what a traced step depends on: under autocast its matrix
    products take ``dtype``."""
    return tuple((device, torch.get_autocast_dtype(device)) for device in _AUTOCAST_DEVICES
                 if torch.is_autocast_enabled(device))


def computing_dtype(lowered: torch.fx.GraphModule, dtype: torch.dtype) -> torch.dtype:
    """The precision a traced step computes at: the coarsest floating dtype of a value in ``lowered`` (the step
    traced to aten ops, its nodes' ``val``), ``dtype`` (the state's) where none is coarser. Float32 states whose
    products round to bfloat16 (an autocast region, or casts in the step) carry bfloat16 rounding in every step's
    value and never converge to float32's tolerance: a solve's default tolerance follows this dtype."""
    coarsest = dtype
    for node in lowered.graph.nodes:
        value = node.meta.get("val")
        if (isinstance(value, torch.Tensor) and value.is_floating_point()
                and torch.finfo(value.dtype).eps > torch.finfo(coarsest).eps):
            coarsest = value.dtype
    return coarsest


@contextlib.contextmanager
def autocast_as(state: tuple):
    """Run under the autocast settings ``state`` (from :func:`autocast_state`), whatever is in force outside."""
    with contextlib.ExitStack() as stack:
        for device in _AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        for device, dtype in state:
            stack.enter_context(torch.autocast(device, dtype=dtype))
        yield


def in_float64(tree):
    """``tree`` with every floating-point tensor detached and in float64 (other leaves unchanged)."""
    return pytree.tree_map(
        lambda leaf: leaf.detach().double() if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() else leaf,
        tree,
    )


def copied(args) -> list:
    """``args`` with every tensor but the parameters cloned: a reference run of a graph on them leaves the
    caller's values as they were (a buffer the graph updates in place: running statistics, a call counter, a
    cache). Parameters are shared: a graph that writes its own parameters is not run twice by seqpar."""
    return [value.clone() if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter)
            else value for value in args]
