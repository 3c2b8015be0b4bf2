"""The per-step slices of one tensor, as the rewritten graph reads them (``passes.slices`` finds them)."""

from __future__ import annotations

import torch


def slice_steps(source: torch.Tensor, dim: int, start: int, stride: int, length: int) -> torch.Tensor:
    """``stack([source.select(dim, start + stride * l) for l in range(length)])`` in one or two ops.

    ``source.movedim(dim, 0)``, then its rows ``start, start + stride, ..``
    (for ``stride < 0`` the rows ``start + stride (length - 1) .. start``,
    flipped), contiguous as the solver's traced graphs expect: a view of
    ``source`` where the rows are consecutive on dim 0 (``W[l]``), one copy
    otherwise (``x[:, t]``, ``W[2 l]``, ``W[L - 1 - l]``). The rewrite puts
    this call in the graph; the backend's probe calls it on example values.
    """
    rows = source.movedim(dim, 0) if dim else source
    step = abs(stride)
    first = start if stride > 0 else start + stride * (length - 1)
    picked = rows[first : first + step * (length - 1) + 1 : step]
    return (picked if stride > 0 else picked.flip(0)).contiguous()
