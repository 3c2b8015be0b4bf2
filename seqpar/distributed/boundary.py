"""A rank's block of a chain's linear system as one affine map of its boundary, and the scan over ranks.

A rank owning the steps ``l = a .. b`` of the linear recurrence that one
Newton iteration solves (or of the adjoint recursion),

    y_l = A_l y_{l-1} + c_l,      y_{a-1} = y_in  (the previous rank's last value),

has ``y_l = Phi_l y_in + e_l`` with ``Phi_l = A_l ... A_a`` and ``e`` the
solution from ``y_in = 0``. Its last value is therefore the affine map

    y_b = Phi y_in + e_b,       Phi = A_b A_{b-1} ... A_a,

and the ranks' maps compose: an exclusive scan over the ``P`` maps (each rank
folds those of the ranks before it, ``P`` small) gives every rank its own
``y_in``, after which it solves its block locally from it. The adjoint
recursion ``lam_{l-1} = g_{l-1} + J_l^T lam_l`` runs right to left with the
transposed maps ``Phi^T``. Blocks are ``(M, N, w, w)`` (``"full"``), their
diagonals ``(M, N, w)`` (``"diag"``) or absent (``"identity"``: ``A_l = I``).
"""

from __future__ import annotations

import torch


def block_product(A: torch.Tensor | None, kind: str) -> torch.Tensor | None:
    """``Phi = A_{M-1} ... A_1 A_0`` of ``M`` blocks: ``(N, w, w)`` (pairwise products, ``log2 M`` rounds),
    ``(N, w)`` for diagonal blocks; ``None`` for identity blocks."""
    if kind == "identity":
        return None
    if kind == "diag":
        return A.prod(dim=0)
    blocks = A
    while blocks.shape[0] > 1:
        paired = blocks.shape[0] // 2 * 2
        products = torch.matmul(blocks[1:paired:2], blocks[0:paired:2])  # A_{2i+1} A_{2i}
        blocks = torch.cat([products, blocks[paired:]]) if paired < blocks.shape[0] else products
    return blocks[0]


def apply_map(Phi: torch.Tensor | None, y: torch.Tensor, kind: str, *, transpose: bool = False) -> torch.Tensor:
    """``Phi y`` (``Phi^T y`` with ``transpose``) for a state ``y`` of shape ``(N, w)``."""
    if kind == "identity":
        return y
    if kind == "diag":
        return Phi * y
    matrix = Phi.transpose(-1, -2) if transpose else Phi
    return torch.matmul(matrix, y.unsqueeze(-1)).squeeze(-1)


def entry_values(maps, kind: str, *, reverse: bool = False) -> list:
    """Each rank's ``y_in`` from the ranks' maps ``[(Phi_p, e_p)]`` in rank order (``None`` entries: ranks
    whose map does not move anything, their ``y_in`` and output ``0``).

    Forward: ``y_in^0 = 0``, ``y_in^{p+1} = Phi_p y_in^p + e_p``. ``reverse`` (the
    adjoint): ``y_in^{P-1} = 0``, ``y_in^{p-1} = Phi_p^T y_in^p + e_p``. The
    returned list has a ``None`` where ``y_in`` is exactly zero.
    """
    order = range(len(maps) - 1, -1, -1) if reverse else range(len(maps))
    entries = [None] * len(maps)
    carried = None
    for index in order:
        entries[index] = carried
        if maps[index] is None:
            continue
        Phi, e = maps[index]
        carried = e if carried is None else apply_map(Phi, carried, kind, transpose=reverse) + e
    return entries


def fold_entry(c: torch.Tensor, A: torch.Tensor | None, kind: str, y_in: torch.Tensor, *,
               reverse: bool = False) -> torch.Tensor:
    """``c`` with the entry value taken into its first equation: ``c_0 + A_0 y_in`` (forward) or, for the
    reverse recursion, ``c_{M-1} + y_in`` (the right neighbour's ``J^T lam`` is already transposed); a copy."""
    c = c.clone()
    if reverse:
        c[-1] += y_in
    else:
        c[0] += apply_map(None if A is None else A[0], y_in, kind)
    return c
