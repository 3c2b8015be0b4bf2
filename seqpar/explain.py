"""``seqpar.explain``: what the backend would do with a model, without guessing."""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import torch

from .backend import SeqparBackend
from .options import Options
from .report import Report, hints_for

_OPTION_NAMES = frozenset(field.name for field in dataclasses.fields(Options))


def explain(model_or_fn, *args, options: dict | None = None, **kwargs) -> Report:
    """Compile ``model_or_fn`` with seqpar, call it once as ``model_or_fn(*args, **kwargs)`` and report every chain.

    As with ``torch._dynamo.explain(fn)(*args, **kwargs)``, the arguments are
    the call's: ``seqpar.explain(gpt2, ids, use_cache=False)``. ``options`` are
    the backend's (see :class:`seqpar.options.Options`), as for
    ``torch.compile(..., options=)``: ``seqpar.explain(model, x,
    options={"min_chain": 4})``; the inner backend defaults to "eager" here,
    since only the decisions matter (inductor's ``mode``, which concerns that
    compile alone, is then left out). ``report.chains`` lists found chains with
    their decision ("parallel", "sequential" or "rejected") and reason;
    ``print(report)`` shows a table.

    Deprecated: without ``options=``, a keyword that names a seqpar option and
    that ``model_or_fn``'s signature does not name (``explain(model, x,
    min_chain=4)``) is still read as an option, with a DeprecationWarning.
    """
    if options is None:
        options, kwargs = _legacy_options(model_or_fn, kwargs)
    if "inner" not in options:
        options = {**options, "inner": "eager", "mode": "default"}
    backend = SeqparBackend(options)
    torch._dynamo.reset()
    try:
        torch.compile(model_or_fn, backend=backend)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    report = Report(graph_count=len(backend.graphs))
    for graph in backend.graphs:
        report.chains += graph.chains
    if isinstance(model_or_fn, torch.nn.Module):  # chains solved outside the graph (seqpar.distributed)
        report.chains += [module.seqpar_chain_report(name) for name, module in model_or_fn.named_modules()
                          if hasattr(module, "seqpar_chain_report")]
    report.hints = hints_for(report.chains, report.graph_count)
    return report


def _legacy_options(model_or_fn, kwargs: dict) -> tuple[dict, dict]:
    """``(options, call keywords)``: the keywords that can only be seqpar options, and the rest.

    A keyword is an option when it names one and the callable's signature does
    not name it as a parameter; with no readable signature every keyword is the call's.
    """
    function = model_or_fn.forward if isinstance(model_or_fn, torch.nn.Module) else model_or_fn
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return {}, kwargs
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    legacy = {name: value for name, value in kwargs.items() if name in _OPTION_NAMES and name not in named}
    if legacy:
        warnings.warn(
            f"seqpar.explain: pass backend options as options={legacy!r}; keywords are the model's "
            "arguments (as for torch._dynamo.explain)",
            DeprecationWarning,
            stacklevel=3,
        )
    return legacy, {name: value for name, value in kwargs.items() if name not in legacy}
