"""What one chain solve reports."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SolveStats:
    """What one chain solve did.

    ``iterations``: parallel iterations run (1 for an affine chain solved by
    one linear solve, :func:`~seqpar.runtime.newton.linear_solve`);
    ``residual``: largest update at the last iteration in units of the
    tolerance (<= 1 means converged; 0 after the one linear solve of an
    affine chain, which is exact);
    ``fallback``: why the sequential loop finished the chain, ``None`` if it did
    not; ``sequential_steps``: how many steps that loop evaluated;
    ``evaluations``: step evaluations in all (batched positions, counted one
    per position whether or not its result is used, plus the sequential
    steps; a sequential loop makes ``L``);
    ``jacobian_evaluations``: how many of the parallel evaluations also
    computed that position's Jacobian (``"full"``, ``"diag"``: every one;
    ``"identity"``: none; ``"estimate"``: one VJP per position, at its first
    evaluation only, so at most ``L``);
    ``window``: active positions per iteration (``None``: the whole chain);
    ``loop``: how a sequential solve ran its steps (``"generated"``: the
    step's aten calls written out as one loop, :mod:`~seqpar.runtime.rolled`;
    ``"step calls"``: the step called per step; ``""``: not a sequential solve);
    ``seconds``: the solve's wall time on this call: the sequential loop's
    (without generating it), or the parallel solve's with its parameter
    stacking (``None``: not measured);
    ``structure``: the step's Jacobian as the traced graph proves it
    (:attr:`~seqpar.runtime.structure.StepStructure.label`: ``"diagonal
    affine"``, ``"diagonal"``, ``"affine"`` or ``"general"``; ``""`` for a
    sequential solve).
    """

    length: int
    jacobian: str
    iterations: int = 0
    converged: bool = False
    residual: float = float("inf")
    fallback: str | None = None
    sequential_steps: int = 0
    direction: str = "forward"
    evaluations: int = 0
    jacobian_evaluations: int = 0
    window: int | None = None
    loop: str = ""
    seconds: float | None = None
    structure: str = ""
