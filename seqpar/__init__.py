"""seqpar: a torch.compile backend that solves chains of sequential layers in parallel."""

from .runtime import SolveStats, solve_chain

__all__ = ["solve_chain", "SolveStats"]
