"""``seqpar.explain``: what the backend would do with a model, without guessing."""

from __future__ import annotations

import torch

from .backend import SeqparBackend
from .report import Report

# More graphs than this for one call suggest a loop broken into pieces.
FRAGMENTED_GRAPHS = 8
# Unrolled chains from this length on took Dynamo long to trace (~1 s per 100 blocks, seconds per UNet call).
LONG_UNROLLED = {"layers": 256, "residual": 256, "transformer": 64, "denoise": 100}


def explain(model_or_fn, *example_inputs, **options) -> Report:
    """Compile ``model_or_fn`` with seqpar, run it once on ``example_inputs`` and report every chain.

    ``options`` are the backend's options (see :class:`seqpar.options.Options`);
    the inner backend defaults to "eager" here, since only the decisions matter.
    ``report.chains`` lists found chains with their decision ("parallel",
    "sequential" or "rejected") and reason; ``print(report)`` shows a table.
    """
    options.setdefault("inner", "eager")
    backend = SeqparBackend(options)
    torch._dynamo.reset()
    try:
        torch.compile(model_or_fn, backend=backend)(*example_inputs)
    finally:
        torch._dynamo.reset()
    report = Report(graph_count=len(backend.graphs))
    for graph in backend.graphs:
        report.chains += graph.chains
    if report.graph_count >= FRAGMENTED_GRAPHS:
        report.hints.append(
            f"the call was split into {report.graph_count} graphs (graph breaks): no backend sees a loop that "
            "arrives in pieces. For diffusers sampling loops wrap the scheduler with "
            "seqpar.diffusion.traceable(scheduler); torch._dynamo.explain(fn)(...) lists the breaks."
        )
    report.hints += _compile_time_hints(report.chains)
    return report


def _compile_time_hints(chains) -> list[str]:
    """Where a long chain reached the backend unrolled: the rolled way to write it, which Dynamo traces once."""
    hints = []
    for index, chain in enumerate(chains):
        if chain.origin != "unrolled" or chain.length < LONG_UNROLLED.get(chain.kind, float("inf")):
            continue
        if chain.kind == "denoise":
            hints.append(
                f"chain {index}: Dynamo traced {chain.length} denoiser calls one by one; "
                "sched.scan_loop(denoiser, x, noise=...) on a seqpar.diffusion.traceable scheduler runs the same "
                "loop as scans, so Dynamo traces the denoiser once"
            )
        else:
            hints.append(
                f"chain {index}: Dynamo traced {chain.length} blocks one by one; seqpar.scan_layers(blocks) runs "
                "identical blocks as one scan over their stacked parameters, so Dynamo traces one block"
            )
    return hints
