"""``seqpar.explain``: what the backend would do with a model, without guessing."""

from __future__ import annotations

import torch

from .backend import SeqparBackend
from .report import Report, hints_for


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
    report.hints = hints_for(report.chains, report.graph_count)
    return report
