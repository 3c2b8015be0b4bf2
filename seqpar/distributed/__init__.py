"""Chains across devices: Newton + cyclic reduction split over the ranks of a ``torch.distributed`` group.

* :func:`solve_chain`: ``seqpar.solve_chain`` whose per-step inputs (and states) are split over the ranks: every
  rank evaluates its own steps and Jacobians at once, and the linear steps couple the ranks only through one
  affine map of each rank's boundary, combined by an all-gather of ``P`` rows per iteration (:mod:`.solve`,
  :mod:`.boundary`). Exact gradients by the same split of the adjoint.
* :class:`LayerParallel`: a stack of identical blocks split over the ranks (each keeps its share's parameters,
  as a pipeline stage does), run forward and backward as distributed chain solves (:mod:`.layer_parallel`).

Built on ``torch.distributed`` collectives (gloo on CPU, NCCL on GPU); every wait is bounded by the process
group's timeout, and a rank's failure raises on every rank (:mod:`.group`).
"""

from .group import RankFailure
from .layer_parallel import LayerParallel
from .solve import solve_chain

__all__ = ["solve_chain", "LayerParallel", "RankFailure"]
