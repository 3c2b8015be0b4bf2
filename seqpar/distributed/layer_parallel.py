"""``LayerParallel``: a stack of identical blocks split over the ranks, run as one distributed chain solve.

``s_{l+1} = block_l(s_l)`` for the ``L`` blocks of a stack is a chain whose
per-step inputs are the blocks' parameters. Rank ``p`` keeps the blocks of
its contiguous share (``L // P`` each, the first ``L % P`` ranks one more),
as a pipeline stage does; the other ranks' blocks are dropped. A forward
stacks the local blocks' parameters (differentiably: gradients land on the
blocks' own parameters) and solves the chain with
:func:`seqpar.distributed.solve_chain`; the stack's output, the last rank's
last state, is then broadcast to every rank. Its gradient is taken from the
last rank (every rank is expected to compute the same loss of the same
output, as with any replicated value); the input's gradient is rank 0's,
on every rank.

Never slower for having asked: unless ``forward=`` is given, the first
calls with each input layout (shape, dtype, grad mode: the crossover moves
with the batch; :data:`MAX_TRIALS` kept) alternate the forward in parallel
(Newton across ranks) and rank after rank (the exact loop, what a pipeline
does for one sample), two timed calls each, and keep the faster by the
slowest rank's time (so every rank keeps the same); the log and
``seqpar.explain`` say which and why. The backward is the
split adjoint either way.
"""

from __future__ import annotations

import collections
import logging
import time

import torch
import torch.nn as nn
from torch.func import functional_call

from ..report import ChainReport
from ..runtime.trial import Trial, synchronize
from ..scan_layers import validated_blocks
from .group import Ranks
from .solve import solve_chain


log = logging.getLogger("seqpar.distributed")

# Timed calls of each forward (in parallel, rank after rank) before the faster is kept: the minimum of two, so
# that the first call's tracing does not decide.
SAMPLES = 2
# Input layouts (shape, dtype, grad mode) with a trial of their own at most; the least recently used goes.
MAX_TRIALS = 8
_FORMS = {"parallel": "in parallel (Newton across ranks)", "sequential": "rank after rank (the exact loop)"}


def shares(length: int, size: int) -> list[int]:
    """Blocks per rank for ``length`` blocks over ``size`` ranks: ``length // size``, the first ``length % size``
    ranks one more (contiguous, rank 0 first)."""
    return [length // size + (1 if rank < length % size else 0) for rank in range(size)]


class LayerParallel(nn.Module):
    """The stack ``blocks`` (``nn.Sequential``, ``nn.ModuleList`` or a list of modules of one structure, the whole
    stack, the same on every rank) with this rank's share of its blocks, forward and backward solved across
    ``group`` (default: the world). ``solver_options`` go to :func:`seqpar.distributed.solve_chain`; its
    ``batch_ndim`` defaults to 1 here (the blocks may mix everything but the first dim, as attention does).

    ``first``: the global index of this rank's first block; ``blocks``: its blocks (``state_dict`` keys
    ``blocks.<local index>.*``)."""

    def __init__(self, blocks, group=None, **solver_options):
        super().__init__()
        every = validated_blocks(blocks)
        ranks = Ranks(group, what="seqpar.distributed.LayerParallel")
        counts = shares(len(every), ranks.size)
        if min(counts) < 1:
            raise ValueError(f"LayerParallel: {len(every)} blocks cannot give each of {ranks.size} ranks one")
        first = sum(counts[:ranks.rank])
        self._keep(every[first:first + counts[ranks.rank]], ranks, group, first, len(every), solver_options)

    @classmethod
    def from_share(cls, blocks, group=None, **solver_options) -> "LayerParallel":
        """The stack from this rank's blocks only (for a stack too large for one device, each rank builds its own
        contiguous share; shares may be uneven, rank 0 holds the first blocks). Every rank of ``group`` calls
        it together (one all-gather of the shares' sizes)."""
        mine = validated_blocks(blocks)
        ranks = Ranks(group, what="seqpar.distributed.LayerParallel")
        device = next((tensor.device for tensor in mine[0].parameters()), torch.device("cpu"))
        counts = [int(count) for count in ranks.gather(torch.tensor([float(len(mine))]), 1, device)[:, 0].tolist()]
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._keep(mine, ranks, group, sum(counts[:ranks.rank]), sum(counts), solver_options)
        return module

    def _keep(self, blocks, ranks, group, first, total, solver_options):
        """Hold ``blocks`` (this rank's, global index ``first`` of ``total``)."""
        self.group = group
        self.total = total
        self.first = first
        self.blocks = nn.ModuleList(blocks)
        self.last_rank = ranks.size - 1
        self.ranks = ranks.size
        self._last_stats, self._state_shape = None, None
        self.solver_options = {"batch_ndim": 1, **solver_options}
        # Never slower for having asked: unless forward= is given, the first calls with each input layout (the
        # crossover moves with the batch) time the parallel solve against rank after rank (what a pipeline does
        # for one sample) and keep the faster. ``x`` is the same on every rank: every rank picks the same trial.
        self._trials = None if "forward" in solver_options else collections.OrderedDict()
        self._trial_key = None  # the last call's
        self._template = (self.blocks[0],)  # structure only: its tensors are swapped for each block's rows
        self._paths = [(name, (*name.split("."),)) for name, _ in
                       [*self.blocks[0].named_parameters(), *self.blocks[0].named_buffers()]]
        self._statistics = [module for module in self.blocks.modules()
                            if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats]

    @torch.compiler.disable  # collectives: inside a compiled model it runs as it is (Dynamo breaks the graph here)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``block_{L-1}(... block_0(x))`` on every rank (``x`` the same on every rank)."""
        if any(module.training for module in self._statistics):
            raise ValueError("LayerParallel: BatchNorm in training mode updates running statistics, which a "
                             "parallel solve cannot do; call .eval() or keep the blocks sequential")
        # Read at every call (never cached): parameters replaced or updated in place are seen.
        rows = {name: torch.stack([_tensor_at(block, path) for block in self.blocks]) for name, path in self._paths}
        template = self._template[0]

        def step(s, row):
            return functional_call(template, row, (s,))

        trial = self._trial_for(x)
        form = self.solver_options.get("forward", "parallel") if trial is None else trial.kept or trial.next_form()
        timed = trial is not None and trial.kept is None
        if timed:
            synchronize(x.device)
        begin = time.perf_counter()
        states, self._last_stats = solve_chain(step, x, rows, group=self.group, return_stats=True,
                                               **{**self.solver_options, "forward": form})
        if timed:  # every rank keeps the same form: the slowest rank's time decides
            synchronize(x.device)
            elapsed = torch.tensor([time.perf_counter() - begin], dtype=torch.float64, device=x.device)
            trial.add(form, float(Ranks(self.group).gather(elapsed, 1, x.device).max()))
            if trial.kept is not None:
                log.info("seqpar.distributed: LayerParallel of %d blocks: forward %s kept (fastest call: in "
                         "parallel %.3g ms, rank after rank %.3g ms)", self.total, _FORMS[trial.kept],
                         trial.fastest("parallel") * 1e3, trial.fastest("sequential") * 1e3)
        self._state_shape = tuple(x.shape)
        return _FromRank.apply(states[-1], self.last_rank, self.group)

    def _trial_for(self, x: torch.Tensor) -> Trial | None:
        """The trial of ``x``'s layout (made at its first call), or ``None`` where ``forward=`` was given."""
        if self._trials is None:
            return None
        self._trial_key = (tuple(x.shape), x.dtype, torch.is_grad_enabled())
        trial = self._trials.pop(self._trial_key, None) or Trial("parallel", "sequential", SAMPLES)
        self._trials[self._trial_key] = trial
        while len(self._trials) > MAX_TRIALS:
            self._trials.popitem(last=False)
        return trial

    @property
    def _trial(self) -> Trial | None:
        """The last call's trial."""
        return None if self._trials is None else self._trials.get(self._trial_key)

    @property
    def forward_form(self) -> str | None:
        """How the last call's forward ran, or runs from then on: ``"parallel"`` (Newton across ranks) or
        ``"sequential"`` (rank after rank, the exact loop); ``None`` while the first calls with its input layout
        still time both, or before any call (as ``forward=`` says when given)."""
        if self._trials is None:
            return self.solver_options.get("forward", "parallel")
        trial = self._trial
        return None if trial is None else trial.kept

    def seqpar_chain_report(self, name: str) -> ChainReport:
        """This stack as ``seqpar.explain`` lists it (``name``: its path in the model): a chain solved across
        ranks, outside any compiled graph; ``stats`` are this rank's last solve's."""
        return ChainReport(
            kind="layers", length=self.total, state_shape=self._state_shape,
            modules=[f"{name}.blocks" if name else "blocks"], decision="distributed",
            reason=(f"split over {self.ranks} ranks by seqpar.distributed.LayerParallel (blocks {self.first}.."
                    f"{self.first + len(self.blocks) - 1} on this rank); solved by collectives outside the "
                    f"compiled graph; {self._form_reason()}"),
            jacobian=self._last_stats.jacobian if self._last_stats else "",
            method=self.forward_form or "undecided", adjoint="parallel",
            form="solver", last_solve=lambda: self._last_stats,
        )

    def _form_reason(self) -> str:
        if self._trials is None:
            return f"forward {_FORMS[self.forward_form]} (forward={self.forward_form!r} given)"
        trial = self._trial
        if trial is None or trial.kept is None:
            return "forward: the first calls with each input shape time the parallel solve against rank after rank"
        parallel, sequential = trial.fastest("parallel") * 1e3, trial.fastest("sequential") * 1e3
        return (f"forward {_FORMS[trial.kept]}, the faster on this group's first calls with input shape "
                f"{self._trial_key[0]} (in parallel {parallel:.3g} ms, rank after rank {sequential:.3g} ms)")

    def extra_repr(self) -> str:
        return f"blocks {self.first}..{self.first + len(self.blocks) - 1} of {self.total}"


def _tensor_at(block: nn.Module, path: tuple) -> torch.Tensor:
    """``block``'s parameter or buffer at ``path`` (``("0", "weight")``), looked up in the modules' own dicts."""
    module = block
    for name in path[:-1]:
        module = module._modules[name]
    tensors = module._parameters if path[-1] in module._parameters else module._buffers
    return tensors[path[-1]]


class _FromRank(torch.autograd.Function):
    """``value`` of rank ``source`` on every rank; backward: the gradient of ``source``'s own result reaches
    its ``value`` (every rank computes the same loss of the same value), the other ranks' ``value`` get zero."""

    @staticmethod
    def forward(ctx, value, source, group):
        ranks = Ranks(group, what="seqpar.distributed.LayerParallel")
        ctx.source, ctx.mine = source, ranks.rank == source
        row = ranks.broadcast(value.detach() if ctx.mine else None, value.numel(), source, value.device)
        return row.view(value.shape).to(value.dtype)

    @staticmethod
    def backward(ctx, grad):
        return (grad if ctx.mine else torch.zeros_like(grad)), None, None
