"""Two ways of computing the same values, timed alternately on the first calls; the faster is kept.

    kept = second   if  min_k t_second,k < min_k t_first,k,   else first,

once each has ``samples`` timed calls. The minimum, not the median, because
interference (another process, a page fault) only ever adds time. The
backend's speed trial (rewritten graph against the original,
:mod:`seqpar.speed`) and the fused loop's (the step compiled by inductor
against the generated loop of eager's kernels, :mod:`.fused_loop`) are two.
"""

from __future__ import annotations

import torch


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
        if self.kept is None and min(map(len, self.times.values())) >= self.samples:
            self.kept = self.second if self.fastest(self.second) < self.fastest(self.first) else self.first

    def fastest(self, form: str) -> float:
        return min(self.times[form])


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work before a clock is read (an accelerator runs asynchronously; CPU work is
    done when a call returns)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
