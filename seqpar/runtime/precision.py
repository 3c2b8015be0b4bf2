"""Widening to float64: the reference precision the checks of a solve compare against."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree


def in_float64(tree):
    """``tree`` with every floating-point tensor detached and in float64 (other leaves unchanged)."""
    return pytree.tree_map(
        lambda leaf: leaf.detach().double() if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() else leaf,
        tree,
    )
