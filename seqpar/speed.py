"""Never slower than asked for: the rewritten graph timed against the original on the first calls.

The policy decides per chain from crossovers measured on chains alone
(:mod:`seqpar.passes.policy`); a whole graph can still lose, where what the
rewrite leaves around the chains costs more than the chains win (a
kept-sequential chain whose per-step inputs and states are materialised for
all ``L`` steps at once, megabytes where eager's loop stays in cache). Under
policy ``"auto"`` the backend therefore times both forms of a graph that is
not differentiated (inference: grad disabled, or nothing requiring grad) on
its calls after the first: the rewritten graph (compiled by the inner
backend) and the original graph (the ops Dynamo traced, run as they are, as
eager runs them), alternating, one form per call, ``SAMPLES`` calls each.
The faster by its fastest call runs from then on (:class:`~seqpar.runtime.trial.Trial`):

    original   if  min_k t_original,k < min_k t_rewritten,k,   else rewritten.

A training graph is not timed: its forward alone
does not tell which form trains faster (the parallel adjoint is where seqpar
wins most), and the trial would pay for it. Both forms give the original
graph's values within the stated tolerances, so the calls of the trial differ
from each other only by rounding; each call runs exactly one form, so
in-place updates of inputs (running statistics, caches) happen once per call.
"""

from __future__ import annotations

import itertools
import time

import torch

from .runtime import fused_loop
from .runtime.trial import Trial, synchronize

SAMPLES = 3
DECIDED_AFTER = 1 + 2 * SAMPLES  # calls after which the trial has decided, where none was verified or differentiated
REWRITTEN, ORIGINAL = "rewritten", "original"


class SpeedTrial(Trial):
    """Calls of each form timed so far (seconds) and, once both have ``SAMPLES``, the form kept."""

    def __init__(self):
        super().__init__(REWRITTEN, ORIGINAL, SAMPLES)

    def summary(self) -> str:
        """One line for the report: both forms' fastest calls and the form kept."""
        rewritten, original = self.times[REWRITTEN], self.times[ORIGINAL]
        if self.kept is None:
            return f"speed trial running ({len(rewritten)} + {len(original)} of {SAMPLES} + {SAMPLES} calls timed)"
        ratio = min(original) / min(rewritten)
        return (f"timed against the original graph (fastest of {SAMPLES} calls each): rewritten "
                f"{min(rewritten) * 1e3:.3g} ms, original {min(original) * 1e3:.3g} ms "
                f"({ratio:.2f}x): the {self.kept} graph runs from then on")


def differentiated(graph: torch.nn.Module, args) -> bool:
    """Whether a call of ``graph`` with these inputs records autograd: grad enabled and some input, or a
    parameter the graph holds itself (where Dynamo did not lift it to an input), requires grad. Decided once,
    at compile time: Dynamo guards grad mode and every input's ``requires_grad``."""
    tensors = itertools.chain(args, graph.parameters())
    return torch.is_grad_enabled() and any(isinstance(value, torch.Tensor) and value.requires_grad for value in tensors)


def timed_call(function, args):
    """``(function(*args), seconds)``, waiting for the devices the inputs live on before and after."""
    devices = {arg.device for arg in args if isinstance(arg, torch.Tensor) and arg.device.type != "cpu"}
    for device in devices:
        synchronize(device)
    start = time.perf_counter()
    out = function(*args)
    for device in devices:
        synchronize(device)
    return out, time.perf_counter() - start
