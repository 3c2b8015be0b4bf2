"""Inputs of reference runs: widened to float64 (the precision the checks of a solve compare against), and
copied, so that a second run of a computation leaves the caller's tensors as they were."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree


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
