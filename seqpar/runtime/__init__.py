"""seqpar's chain solver: Newton / quasi-Newton / Picard + Parallel Cyclic Reduction.

Knows nothing of FX. ``solve_chain(step, s0, xs, shared)`` solves
``s_l = step(s_{l-1}, x_l, *shared)`` for all ``l`` at once.
"""

from .chain import solve_chain
from .newton import Tolerance
from .stats import SolveStats
from .pcr import solve_affine_recurrence
from .kernels import cpu_scan

__all__ = ["solve_chain", "solve_affine_recurrence", "SolveStats", "Tolerance", "cpu_scan"]
