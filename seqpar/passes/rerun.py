"""Whether a graph may run again after a call of it stopped part-way (it ran out of memory).

A call that raised before its end may have done part of its work. Running
the graph again (in either of its forms, original or rewritten) gives the
outputs a single run gives exactly when the stopped attempt left nothing that
the second run reads or the caller sees:

  * no write to a tensor the graph did not make itself: every in-place node
    writes to a value whose aliases (tensors sharing its storage, read from
    the nodes' example values as Dynamo records them) include no graph input,
    parameter or buffer (``placeholder``, ``get_attr``); a write into a buffer
    the graph allocates (RWKV's ``output[:, t] = ...``) is made afresh by the
    second run;
  * no random draw (the generator has advanced), no change of global state,
    no BatchNorm in training mode (running statistics), no module call or
    higher-order op whose body the graph does not show
    (:func:`~seqpar.passes.effects.side_effect`).

:func:`rerun_hazard` names the first node that breaks this, or returns
``None`` where the graph may run again.
"""

from __future__ import annotations

import torch.fx as fx

from .effects import is_random, mutates, side_effect
from .inplace import Aliases
from .tokens import target_name


def rerun_hazard(graph: fx.Graph) -> str | None:
    """Why a call of ``graph`` that stopped part-way may not simply be run again, or ``None``."""
    aliases = None
    for node in graph.nodes:
        if is_random(node):
            return f"{node.name} ({target_name(node)}) draws random numbers"
        reason = side_effect(node, on_state=False, in_place=False)
        if reason is not None:
            return reason
        if not mutates(node):
            continue
        written = node.kwargs.get("out", node.args[0] if node.args else None)
        aliases = aliases or Aliases(graph)
        shared = aliases.of(written) if isinstance(written, fx.Node) else None
        if shared is None:
            return f"{node.name} ({target_name(node)}) writes in place to a tensor whose aliases are unknown"
        outside = next((alias for alias in shared if alias.op in ("placeholder", "get_attr")), None)
        if outside is not None:
            return f"{node.name} ({target_name(node)}) writes in place to the graph's input {outside.name}"
    return None
