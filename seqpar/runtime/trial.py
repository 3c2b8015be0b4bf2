"""Two ways of computing the same values, timed alternately on the first calls; the faster is kept.

    kept = second   if  min_k t_second,k < min_k t_first,k,   else first,

once each has ``samples`` timed calls, or earlier, once each has one, where
one form's slowest call is ``DECISIVE`` times faster than the other's
fastest (``DECISIVE * max_k t_a,k < min_k t_b,k``): more calls of the slow
form would only cost (a rewrite 100x faster than eager's training step would
pay two more eager steps). The minimum, not the median, because
interference (another process, a page fault) only ever adds time. The
backend's speed trial (rewritten graph against the original,
:mod:`seqpar.speed`) and the fused loop's (the step compiled by inductor
against the generated loop of eager's kernels, :mod:`.fused_loop`) are two.
"""

from __future__ import annotations

import torch

DECISIVE = 4.0


class Trial:
    """Timed calls of ``first`` and ``second`` so far (seconds, by form) and, once both have ``samples``, the
    form kept (``kept``, ``None`` before)."""

    def __init__(self, first: str, second: str, samples: int):
        self.first, self.second, self.samples = first, second, samples
        self.times: dict[str, list[float]] = {first: [], second: []}
        self.kept: str | None = None

    def next_form(self) -> str:
        """The form the next timed call runs: the one with fewer samples, ``first`` first."""
        return self.second if len(self.times[self.second]) < len(self.times[self.first]) else self.first

    def add(self, form: str, seconds: float) -> None:
        self.times[form].append(seconds)
        first, second = self.times[self.first], self.times[self.second]
        if self.kept is not None or not (first and second):
            return
        if (min(len(first), len(second)) >= self.samples
                or DECISIVE * max(first) < min(second) or DECISIVE * max(second) < min(first)):
            self.kept = self.second if min(second) < min(first) else self.first

    def fastest(self, form: str) -> float:
        return min(self.times[form])


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work before a clock is read (an accelerator runs asynchronously; CPU work is
    done when a call returns)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
