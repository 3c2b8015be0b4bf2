"""A chain's per-step inputs as stacked tensors ``(L, ...)``, by kind (:class:`~.chain.ChainInput`).

``constant`` literals become one tensor (:func:`constant_stack`); a ``slice``
input ``P`` becomes its ``L`` slices (:func:`~seqpar.runtime.slicing.slice_steps`);
``parameter`` and ``computed`` inputs become whatever ``stack(nodes)`` makes
of their ``L`` nodes. The tracer (example tensors for the program) and the
predictability probe (real values) both build them here.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from ..runtime.slicing import slice_steps
from .chain import Chain


def constant_stack(chain_input, dtype: torch.dtype, device) -> torch.Tensor:
    """Per-step literals -> one tensor ``(L, ...)``: floats in the state dtype, ints as int64."""
    values = chain_input.values
    if all(isinstance(value, torch.Tensor) for value in values):
        return torch.stack([value.detach().to(device) for value in values])
    if all(isinstance(value, int) and not isinstance(value, bool) for value in values):
        return torch.tensor(values, dtype=torch.int64, device=device)
    return torch.tensor([float(value) for value in values], dtype=dtype, device=device)


def stacked_inputs(
    chain: Chain,
    value_of: Callable[[fx.Node], torch.Tensor],
    stack: Callable[[list[fx.Node]], torch.Tensor],
    device,
) -> list[torch.Tensor]:
    """One ``(L, ...)`` tensor per entry of ``chain.per_step``.

    ``value_of(node)``: a slice input's source tensor; ``stack(nodes)``: the
    ``L`` values of a parameter or computed input, stacked on a new dim 0.
    """
    tensors = []
    for item in chain.per_step:
        if item.kind == "constant":
            tensors.append(constant_stack(item, chain.state_dtype, device))
        elif item.kind == "slice":
            tensors.append(slice_steps(value_of(item.nodes[0]), item.dim, item.start, item.stride, chain.length))
        else:
            tensors.append(stack(item.nodes))
    return tensors
