"""Run the original graph beside the rewritten one and compare.

Tolerances are dtype-aware: two evaluations of the same function in one dtype
may differ by the solver tolerance plus the rounding of a different order of
operations, amplified by the chain's conditioning.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

# (rtol, atol) by dtype: a few hundred ulps relative, with an absolute floor.
VERIFY_TOLERANCE = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-3, 1e-5),
    torch.float16: (5e-2, 1e-2),
    torch.bfloat16: (5e-2, 1e-2),
}


def compare_outputs(expected, actual) -> tuple[bool, float, str]:
    """``(all close, largest error relative to the tolerance, description)`` over all output tensors."""
    worst, where = 0.0, ""
    for index, (want, got) in enumerate(zip(pytree.tree_leaves(expected), pytree.tree_leaves(actual))):
        if not isinstance(want, torch.Tensor) or not want.is_floating_point():
            continue
        rtol, atol = VERIFY_TOLERANCE.get(want.dtype, (1e-3, 1e-5))
        want64, got64 = want.detach().double(), got.detach().double()
        if not torch.equal(torch.isfinite(want64), torch.isfinite(got64)):
            return False, float("inf"), f"output {index}: non-finite values differ"
        finite = torch.isfinite(want64)
        error = ((want64 - got64).abs() / (atol + rtol * want64.abs()))[finite]
        ratio = float(error.max()) if error.numel() else 0.0
        if ratio > worst:
            worst, where = ratio, f"output {index}: max |error| = {ratio:.3g} x tolerance (rtol={rtol}, atol={atol})"
    return worst <= 1.0, worst, where or "all outputs equal"
