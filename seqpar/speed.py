"""Never slower than asked for: the rewritten graph timed against the original on the first calls.

The policy decides per chain from crossovers measured on chains alone
(:mod:`seqpar.passes.policy`); a whole graph can still lose, where what the
rewrite leaves around the chains costs more than the chains win (a
kept-sequential chain whose per-step inputs and states are materialised for
all ``L`` steps at once, megabytes where eager's loop stays in cache). Under
policy ``"auto"`` the backend therefore times both forms of a graph on its
calls after the first: the rewritten graph (compiled by the inner backend)
and the original graph (the ops Dynamo traced, run as they are, as eager runs
them), alternating, one form per call, ``SAMPLES`` calls each (one each
where one form is 4x faster). The faster by its fastest call runs from then
on (:class:`~seqpar.runtime.trial.Trial`):

    original   if  min_k t_original,k < min_k t_rewritten,k,   else rewritten.

A call's time is its forward's, and for a differentiated graph (one that
records autograd) also its backward's: from the first gradient of the graph's
outputs computed to the end of that backward pass (:func:`time_backward`).
The forward alone does not tell which form trains faster (the parallel
adjoint is where seqpar wins most). The pass's work after the graph's own
backward (the layers before it) is the same for both forms. A timed call whose
backward has not run by the graph's next call is not counted; after
``SAMPLES`` such calls (a differentiated graph called for its values only:
evaluation without ``torch.no_grad``) the trial starts again timing forwards
alone. Both forms give the original graph's values within the stated
tolerances, so the calls of the trial differ from each other only by
rounding; each call runs exactly one form, so in-place updates of inputs
(running statistics, caches) happen once per call.
"""

from __future__ import annotations

import itertools
import time
from typing import Callable

import torch
import torch.utils._pytree as pytree

from .runtime.trial import Trial, synchronize

SAMPLES = 3
DECIDED_AFTER = 1 + 2 * SAMPLES  # calls after which the trial has decided, where none was verified
REWRITTEN, ORIGINAL = "rewritten", "original"


class SpeedTrial(Trial):
    """Calls of each form timed so far (seconds) and, once both have ``SAMPLES``, the form kept.

    ``with_backward``: whether a call's time includes its backward; ``decided(summary)`` is called once, when
    the trial decides (in a backward pass where the last sample was a backward's)."""

    def __init__(self, with_backward: bool, decided: Callable[[str], None]):
        super().__init__(REWRITTEN, ORIGINAL, SAMPLES)
        self.with_backward = with_backward
        self.decided = decided
        self.waiting: object | None = None  # the timed call whose backward has not ended yet
        self.without_backward = 0  # timed calls whose backward had not run by the graph's next call
        self.stopped: str | None = None  # why a form could not run (it ran out of memory)

    def add(self, form: str, seconds: float) -> None:
        undecided = self.kept is None
        super().add(form, seconds)
        if undecided and self.kept is not None:
            self.decided(self.summary())

    def next_call(self) -> None:
        """At every call of the graph: a timed call still waiting for its backward is not counted; after
        ``SAMPLES`` of them the trial starts again, timing forwards alone."""
        if self.waiting is None:
            return
        self.waiting = None
        self.without_backward += 1
        if self.with_backward and self.without_backward >= SAMPLES:
            self.with_backward = False
            self.times = {form: [] for form in self.times}

    def timed(self, form: str, forward_seconds: float, outputs) -> None:
        """One timed call of ``form`` that returned ``outputs``: counted now, or at the end of its backward."""
        if not self.with_backward:
            self.add(form, forward_seconds)
            return
        waiting = self.waiting = object()

        def finished(backward_seconds: float) -> None:
            if self.waiting is waiting:  # not passed over by a later call
                self.waiting = None
                self.add(form, forward_seconds + backward_seconds)

        if not time_backward(outputs, finished):
            self.waiting = None
            self.add(form, forward_seconds)

    def out_of_memory(self, form: str, why: str) -> None:
        """``form`` ran out of memory (``why``): the other form is kept without more timing."""
        self.stopped, self.waiting = why, None
        self.kept = self.second if form == self.first else self.first
        self.decided(self.summary())

    def summary(self) -> str:
        """One line for the report: both forms' fastest calls and the form kept."""
        if self.stopped is not None:
            return f"speed trial stopped: {self.stopped}: the {self.kept} graph runs from then on"
        rewritten, original = self.times[REWRITTEN], self.times[ORIGINAL]
        what = "calls, forward and backward" if self.with_backward else "calls"
        if self.kept is None:
            return f"speed trial running ({len(rewritten)} + {len(original)} of {SAMPLES} + {SAMPLES} {what} timed)"
        ratio = min(original) / min(rewritten)
        return (f"timed against the original graph (fastest of {SAMPLES} {what} each): rewritten "
                f"{min(rewritten) * 1e3:.3g} ms, original {min(original) * 1e3:.3g} ms "
                f"({ratio:.2f}x): the {self.kept} graph runs from then on")


def differentiated(graph: torch.nn.Module, args) -> bool:
    """Whether a call of ``graph`` with these inputs records autograd: grad enabled and some input, or a
    parameter the graph holds itself (where Dynamo did not lift it to an input), requires grad. Decided once,
    at compile time: Dynamo guards grad mode and every input's ``requires_grad``."""
    tensors = itertools.chain(args, graph.parameters())
    return torch.is_grad_enabled() and any(isinstance(value, torch.Tensor) and value.requires_grad for value in tensors)


def _devices(tensors) -> set[torch.device]:
    return {value.device for value in tensors if isinstance(value, torch.Tensor) and value.device.type != "cpu"}


def timed_call(function, args):
    """``(function(*args), seconds)``, waiting for the devices the inputs live on before and after."""
    devices = _devices(args)
    for device in devices:
        synchronize(device)
    start = time.perf_counter()
    out = function(*args)
    for device in devices:
        synchronize(device)
    return out, time.perf_counter() - start


def time_backward(outputs, finished: Callable[[float], None]) -> bool:
    """Arrange ``finished(seconds)`` for the first backward pass that reaches ``outputs``: the seconds from
    the first of their gradients computed to the end of that pass. ``False`` where no output records
    autograd. The hooks sit on the outputs' autograd nodes and go with them: a call never differentiated
    leaves nothing behind."""
    recorded = [value for value in pytree.tree_leaves(outputs)
                if isinstance(value, torch.Tensor) and value.grad_fn is not None]
    if not recorded:
        return False
    devices = _devices(recorded)
    started = False

    def start(_gradient) -> None:
        nonlocal started
        if started:  # a second pass over a retained graph
            return
        started = True
        for device in devices:
            synchronize(device)
        begin = time.perf_counter()

        def end() -> None:
            for device in devices:
                synchronize(device)
            finished(time.perf_counter() - begin)

        torch.autograd.Variable._execution_engine.queue_callback(end)

    torch.autograd.graph.register_multi_grad_hook(recorded, start, mode="any")
    return True
