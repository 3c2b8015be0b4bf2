"""The kind of a chain, for reports and the policy: "layers", "residual", "denoise", "recurrent", "transformer".

:func:`chain_kind` names a found chain from its per-step inputs and its
step's facts; :func:`guess_kind` names a rejected repeat from its nodes
alone (no step was built for it). Both return one of
:data:`~seqpar.passes.chain.CHAIN_KINDS`.
"""

from __future__ import annotations

import torch
from torch.fx.node import Node

from .batch_dims import ATTENTION_OPS, CONV_OPS, MATMUL_OPS, StepFacts, ndim_of
from .chain import ChainInput
from .slices import is_view, select_index
from .tokens import example, target_name


# A segment that adds (or subtracts) its input to something: a residual block (``out += identity`` too).
_RESIDUAL_OPS = {"add", "__add__", "sub", "iadd", "__iadd__", "add_"}


def chain_kind(per_step: list[ChainInput], facts: StepFacts) -> str:
    """Per-layer parameters: "transformer", "residual" or "layers"; shared weights: "denoise" or "recurrent".

    Per-layer parameters are placeholders per step, or rows of a stacked
    ``nn.Parameter`` (slices ``P[a + l]``, or rows in any order, and views of
    them such as ``W[l].T``). Shared
    weights make a denoiser if the step reads per-step coefficients (literals,
    or scalars/vectors such as ``table[i]``) or is a conv/attention network;
    otherwise an RNN.
    """
    if not any(inp.kind == "parameter" or (inp.kind in ("slice", "computed") and _from_parameter(inp.nodes[0]))
               for inp in per_step):
        coefficients = any(inp.kind == "constant" or (inp.kind in ("computed", "slice") and _step_ndim(inp) <= 1)
                           for inp in per_step)
        return "denoise" if coefficients or facts.attention or facts.convolution else "recurrent"
    if facts.attention:
        return "transformer"
    if facts.residual:
        return "residual"
    return "layers"


def guess_kind(nodes: list[Node], starts: list[Node], next_nodes: list[Node] | None = None) -> str:
    """The kind of a repeat whose segment is ``nodes`` and whose carried values start as ``starts``.

    ``next_nodes``, the next segment where there is one, tells shared weights
    from per-layer ones: segments that read the very same parameters are
    steps of a recurrence over time (or of a denoiser: convolutions), as in
    :func:`chain_kind`; segments reading their own are layers.
    """
    names = {target_name(n) for n in nodes if n.op in ("call_function", "call_method")}
    params = _parameters_read(nodes)
    if params and next_nodes is not None and params == _parameters_read(next_nodes):
        return "denoise" if names & CONV_OPS else "recurrent"
    if names & ATTENTION_OPS or ("softmax" in names and names & MATMUL_OPS):
        return "transformer"
    if any(target_name(n) in _RESIDUAL_OPS and any(s0 in n.args for s0 in starts) for n in nodes
           if n.op in ("call_function", "call_method")):
        return "residual"
    has_params = any(a.op == "placeholder" for n in nodes for a in n.all_input_nodes)
    return "layers" if has_params else "recurrent"


def _parameters_read(nodes: list[Node]) -> set[Node]:
    """The ``nn.Parameter`` placeholders ``nodes`` read."""
    return {arg for n in nodes for arg in n.all_input_nodes
            if arg.op == "placeholder" and isinstance(example(arg), torch.nn.Parameter)}


def _step_ndim(inp: ChainInput) -> int:
    """The ndim of one step's value of a per-step input (a slice's source has one dim more)."""
    ndim = ndim_of(example(inp.nodes[0])) or 0
    return ndim - 1 if inp.kind == "slice" else ndim


def _from_parameter(node: Node) -> bool:
    """Whether ``node`` is an ``nn.Parameter`` placeholder, or views and rows of one (``W[l].T``)."""
    while True:
        picked = select_index(node)
        if picked is None and not is_view(node):
            return node.op == "placeholder" and isinstance(example(node), torch.nn.Parameter)
        node = picked[0] if picked is not None else node.all_input_nodes[0]
