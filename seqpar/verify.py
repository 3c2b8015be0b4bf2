"""Judge a rewritten computation against the original: what "equal" means.

Two evaluations of one function in one dtype differ by rounding, amplified by
the chain's conditioning, plus the solver's stopping tolerance. So results
are compared

1. **normwise, relative to their own scale**: element ``i`` of a row (the
   last dim: one state vector of a chain, one row of a graph output) passes
   when ``|got_i - want_i| <= atol + rtol max_row |want|``, with ``(rtol,
   atol)`` from :data:`VERIFY_TOLERANCE` (``atol`` the dtype's smallest normal
   number: states of 1e-6 are held to the same relative accuracy as states of
   1, and a wrong result can never hide under an absolute floor);
2. where (1) fails and the computation can be repeated in float64,
   **against the float64 result**: ``got`` passes when it is as close to the
   float64 result as ``want`` itself is (within :data:`ROUNDING_FACTOR` times
   ``want``'s own error, plus (1)'s tolerance). This is what "equal" means for
   a chaotic chain (a positive Lyapunov exponent), whose float32 sequential
   result is itself only one of many valid roundings: a solve that differs
   from it but is no further from the exact trajectory than it is, is right.
   Without a float64 result a failing comparison stays a mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

# rtol by dtype: a few hundred ulps relative to the row's scale.
VERIFY_TOLERANCE = {
    torch.float64: 1e-7,
    torch.float32: 1e-3,
    torch.float16: 5e-2,
    torch.bfloat16: 5e-2,
}
# How much further from the float64 result than the reference's own rounding a result may be.
ROUNDING_FACTOR = 4.0


@dataclass
class Verdict:
    """``ok``; ``ratio``: the largest error in units of the allowed error (<= 1 passes); ``detail``: for people."""

    ok: bool
    ratio: float
    detail: str


def compare_outputs(expected, actual, exact=None) -> Verdict:
    """``actual`` against ``expected`` (pytrees of tensors) as the module docstring says.

    ``exact``: the same computation in float64, a pytree like ``expected`` (or
    ``None``), consulted only where the direct comparison fails.
    """
    pairs = list(zip(pytree.tree_leaves(expected), pytree.tree_leaves(actual)))
    exact_leaves = pytree.tree_leaves(exact) if exact is not None else [None] * len(pairs)
    worst, where = 0.0, ""
    for index, ((want, got), reference) in enumerate(zip(pairs, exact_leaves)):
        if not isinstance(want, torch.Tensor) or not want.is_floating_point():
            continue
        if not torch.equal(torch.isfinite(want), torch.isfinite(got)):
            return Verdict(False, float("inf"), f"output {index}: non-finite values differ")
        ratio, how = _ratio(want, got), "normwise"
        if ratio > 1 and isinstance(reference, torch.Tensor) and reference.shape == want.shape:
            ratio, how = _ratio_against_exact(want, got, reference), "against float64"
        if ratio > worst:
            rtol = VERIFY_TOLERANCE.get(want.dtype, 1e-3)
            worst, where = ratio, f"output {index}: max |error| = {ratio:.3g} x tolerance ({how}, rtol={rtol})"
    return Verdict(worst <= 1.0, worst, where or "all outputs equal")


def judge(expected, actual, exact_of: Callable[[], Any]) -> Verdict:
    """:func:`compare_outputs` of ``actual`` against ``expected``; only where that fails, again with
    ``exact_of()`` (the float64 result, or ``None``), computed only then."""
    verdict = compare_outputs(expected, actual)
    return verdict if verdict.ok else compare_outputs(expected, actual, exact_of())


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float64 as rows of its last dim: ``(rows, last)`` (a 0-d tensor is one row of one)."""
    value = tensor.detach().double()
    return value.reshape(-1, value.shape[-1]) if value.ndim else value.reshape(1, 1)


def _allowed(want: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``atol + rtol max_row |want|`` per row ``(rows, 1)``, ignoring non-finite values."""
    rtol = VERIFY_TOLERANCE.get(dtype, 1e-3)
    scale = want.abs().where(torch.isfinite(want), 0).amax(dim=-1, keepdim=True)
    return rtol * scale + torch.finfo(dtype).tiny


def _ratio(want: torch.Tensor, got: torch.Tensor) -> float:
    """The largest ``|got - want| / allowed`` over finite elements (rows of the last dim)."""
    want64, got64 = _rows(want), _rows(got)
    error = (got64 - want64).abs() / _allowed(want64, want.dtype)
    error = error[torch.isfinite(want64)]
    return float(error.max()) if error.numel() else 0.0


def _ratio_against_exact(want: torch.Tensor, got: torch.Tensor, exact: torch.Tensor) -> float:
    """The largest ``|got - exact| / (ROUNDING_FACTOR max_row |want - exact| + allowed)`` over finite elements."""
    want64, got64, exact64 = _rows(want), _rows(got), _rows(exact)
    finite = torch.isfinite(want64) & torch.isfinite(exact64)
    own = (want64 - exact64).abs().where(finite, 0).amax(dim=-1, keepdim=True)
    error = (got64 - exact64).abs() / (ROUNDING_FACTOR * own + _allowed(exact64, want.dtype))
    error = error[finite]
    return float(error.max()) if error.numel() else 0.0
