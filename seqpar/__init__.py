"""seqpar: a torch.compile backend that solves chains of sequential layers in parallel.

``torch.compile(model, backend="seqpar")`` finds chains ``s_l = f_l(s_{l-1})`` in
the traced graph and solves each by Newton / quasi-Newton iterations whose
linear steps are block-bidiagonal systems solved by Parallel Cyclic Reduction.
``seqpar.explain(model, *inputs)`` reports what it finds and decides.
"""

from .explain import explain
from .options import Options
from .report import ChainReport, Report
from .runtime import SolveStats, solve_chain

__all__ = ["explain", "solve_chain", "Options", "Report", "ChainReport", "SolveStats"]
