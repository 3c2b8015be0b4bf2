"""seqpar: a torch.compile backend that solves chains of sequential layers in parallel.

``torch.compile(model, backend="seqpar")`` finds chains ``s_l = f_l(s_{l-1})`` in
the traced graph and solves each by Newton / quasi-Newton iterations whose
linear steps are block-bidiagonal systems solved by Parallel Cyclic Reduction.
``seqpar.explain(model, *inputs)`` reports what it finds and decides;
``seqpar.scan_layers(blocks)`` runs a deep stack as one ``scan`` that Dynamo
traces once (seconds to compile instead of minutes); ``seqpar.scan_rnn(lstm)``
turns an ``nn.RNN``/``nn.LSTM``/``nn.GRU`` into scans over time, solved in parallel;
``seqpar.diffusion.traceable(scheduler)`` makes a diffusers sampling loop one graph;
``seqpar.distributed`` (imported on its own: ``import seqpar.distributed``) splits a chain's steps over the
ranks of a ``torch.distributed`` group (``solve_chain``, ``LayerParallel``).
"""

from . import diffusion
from .explain import explain
from .options import Options
from .report import ChainReport, Report
from .runtime import SolveStats, solve_chain
from .scan_layers import ScannedLayers, scan_layers
from .scan_rnn import ScannedRNN, scan_rnn

__all__ = ["diffusion", "explain", "solve_chain", "scan_layers", "ScannedLayers", "scan_rnn", "ScannedRNN", "Options", "Report",
           "ChainReport", "SolveStats"]
